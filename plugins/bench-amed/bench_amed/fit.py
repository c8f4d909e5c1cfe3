"""The AMED fit: distillation from a teacher solve on a finer grid (Zhou et al., CVPR 2024,
Sec. 3.3; diff-sampler's training loop).

The teacher (Heun by default) runs from the same x_T on a finer grid: M = ceil(teacher_steps
/ intervals) - 1 extra sigmas inside each student interval (the paper's M), placed
uniformly in sigma^(1/7), which is exactly the finer polynomial schedule when the
student's is polynomial with rho = 7, and is read at the student's sigmas. Asking for a
number of teacher steps over the whole schedule keeps the teacher equally accurate at
every budget. For interval i the student takes one AMED interval and the loss is
|| x_student(sigma_{i+1}) - x_teacher(sigma_{i+1}) ||^2 (summed over pixels, mean over the
batch). The paper takes an Adam step per interval, cutting the graph between intervals
("step"); single-step bases start each interval from the teacher's point, multistep bases
(iPNDM, DPM-Solver++) chain their own outputs and history. For multistep bases the
default is one step per batch on the summed losses with the graph kept along the chain
("trajectory"): fitted per interval, an early interval buys its own loss with a history
that costs the later ones more (the README has the measurements).
Deterministic given `seed`: the predictor's initialisation and the fit's noise come from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench.errors import UsageError
from bench.solvers import euler_step, heun_step

from .predictor import AMEDPredictor, PredictorConfig, bottleneck_summary
from .solvers import amed_interval

TEACHERS = {"heun": heun_step, "euler": euler_step}  # one step of each, bench.solvers
LOSSES = ("auto", "step", "trajectory")
RHO = 7.0  # the teacher's grid refines the schedule in sigma^(1/RHO)


@dataclass(frozen=True)
class FitOptions:
    """How a predictor is fitted; every field is part of the cache key."""

    teacher: str = "heun"
    teacher_steps: int = 32  # the teacher's steps over the whole schedule, at least
    samples: int = 1000  # teacher trajectories
    batch: int = 25
    epochs: int = 2  # passes over the teacher trajectories
    seed: int = 20240601  # apart from run seeds, so the fit never sees a run's noise
    loss: str = "auto"  # step (the paper's), trajectory, or auto: trajectory for multistep bases
    lr: float = 1e-2  # Adam (the paper: 5e-3 on 10k trajectories; fewer here, so larger)

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise UsageError(f"unknown AMED teacher '{self.teacher}'; use {' or '.join(TEACHERS)}")
        if self.loss not in LOSSES:
            raise UsageError(f"unknown AMED fit_loss '{self.loss}'; use {', '.join(LOSSES)}")
        if min(self.teacher_steps, self.samples, self.batch, self.epochs) < 1 or not self.lr > 0:
            raise UsageError(
                "AMED teacher_steps, fit_samples, fit_batch and fit_epochs must be >= 1, fit_lr > 0"
            )

    def to_json(self) -> dict:
        return asdict(self)


def refine(sigmas: Tensor, m: int, rho: float = RHO) -> Tensor:
    """The teacher's grid: `m` sigmas inside each interval, uniform in sigma^(1/rho), through
    every student sigma exactly."""
    s = sigmas.double()
    lo, hi = s[1:] ** (1 / rho), s[:-1] ** (1 / rho)
    frac = torch.arange(1, m + 1, dtype=torch.float64, device=s.device) / (m + 1)
    inner = (hi[:, None] + frac[None, :] * (lo - hi)[:, None]) ** rho  # [intervals, m]
    fine = torch.cat([s[:-1, None], inner], dim=1).reshape(-1)
    return torch.cat([fine, s[-1:]]).to(sigmas.dtype)


def teacher_points(model, x_T: Tensor, sigmas: Tensor, options: FitOptions) -> list[Tensor]:
    """The teacher's solution at each student sigma: [x_T, x(sigma_1), ..., x(sigma_min)]."""
    stride = -(-options.teacher_steps // (len(sigmas) - 1))  # M + 1 teacher steps per interval
    points = [x_T]
    # The teacher's steps over the refined grid, keeping the points at the student's sigmas
    step, fine, x = TEACHERS[options.teacher], [float(s) for s in refine(sigmas, stride - 1)], x_T
    with torch.no_grad():
        for i in range(len(fine) - 1):
            x = step(model, x, fine[i], fine[i + 1])
            if (i + 1) % stride == 0:
                points.append(x)
    return points


def feature_dim(model, sigma: float, device) -> int:
    """Size of the pooled bottleneck (one counted call on a single zero input)."""
    x = torch.zeros(1, *model.shape, device=device)
    with torch.no_grad():
        _, raw = model(x, sigma, return_bottleneck=True)
    return bottleneck_summary(raw).shape[1]


Progress = Callable[[int, int], None]


@contextmanager
def one_cpu_thread(device: torch.device):
    """Torch on one thread while fitting on the CPU: the fit's tensors are small, a second
    thread buys little on an idle CPU and costs several times over on a shared one, and the
    result does not depend on the core count."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_predictor(
    model,
    sigmas: Tensor,
    base,
    *,
    afs: bool,
    config: PredictorConfig,
    options: FitOptions,
    progress: Progress | None = None,
) -> tuple[AMEDPredictor, dict]:
    """Fit a predictor for `base` on the schedule `sigmas`; returns it and the fit's statistics."""
    with one_cpu_thread(sigmas.device):
        return _fit(model, sigmas, base, afs, config, options, progress)


def _fit(model, sigmas, base, afs, config, options, progress) -> tuple[AMEDPredictor, dict]:
    start = time.perf_counter()
    device, intervals = sigmas.device, len(sigmas) - 1
    trajectory = options.loss == "trajectory" or (options.loss == "auto" and base.multistep)
    # A deterministic initialisation and noise stream, both from the seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        predictor = AMEDPredictor(config).to(device)
    gen = torch.Generator().manual_seed(options.seed)
    params = list(predictor.parameters())
    opt = torch.optim.Adam(params, lr=options.lr)
    sizes = [min(options.batch, options.samples - k) for k in range(0, options.samples, options.batch)]
    targets: list[list[Tensor]] = []
    losses = torch.zeros(options.epochs, len(sizes), intervals, dtype=torch.float64)
    for epoch in range(options.epochs):
        for b, size in enumerate(sizes):
            # Teacher trajectories from fresh noise in the first epoch, reused after
            if epoch == 0:
                x_T = torch.randn(size, *model.shape, generator=gen).to(device) * sigmas[0]
                with torch.no_grad():
                    targets.append(teacher_points(model, x_T, sigmas, options))
            # One optimizer step per interval, in order
            losses[epoch, b] = fit_batch(model, sigmas, base, predictor, opt, targets[b], afs, trajectory)
            if progress is not None:
                progress(epoch * len(sizes) + b + 1, options.epochs * len(sizes))
    predictor.eval().requires_grad_(False)
    stats = {
        "fit_s": time.perf_counter() - start,
        "loss_first": losses[0, 0].tolist(),
        "loss_last": losses[-1].mean(0).tolist(),
    }
    return predictor, stats


def fit_batch(
    model, sigmas, base, predictor, opt, target: list[Tensor], afs: bool, trajectory: bool
) -> Tensor:
    """One pass over the intervals for a batch of teacher trajectories; returns each
    interval's loss. Single-step bases start each interval from the teacher's point,
    multistep bases from their own output, with their own history.

    - step (the paper): an Adam step per interval, the graph cut between intervals;
    - trajectory: one Adam step per batch on the sum of the interval losses, the graph
      kept along the student's chained solve, so that a multistep base's early intervals
      answer for the history they leave to the later ones.
    """
    params = list(predictor.parameters())
    hist = base.history(len(sigmas) - 1)
    losses = torch.zeros(len(sigmas) - 1, dtype=torch.float64)
    x, total = target[0], 0.0
    for i in range(len(sigmas) - 1):
        x_cur = (x if trajectory else x.detach()) if base.multistep else target[i]
        if not trajectory:
            hist.detach()
        # The student's interval and its squared distance to the teacher (summed over pixels)
        with torch.enable_grad():
            x = amed_interval(model, x_cur, sigmas[i], sigmas[i + 1], base, predictor, hist, afs and i == 0)
            loss = (x.float() - target[i + 1].float()).pow(2).flatten(1).sum(1).mean()
        losses[i] = float(loss.detach())
        if trajectory:
            total = total + loss
        else:
            adam_step(opt, params, loss)
    if trajectory:
        adam_step(opt, params, total)
    return losses


def adam_step(opt, params: list[Tensor], loss: Tensor) -> None:
    """Adam on the predictor alone (the network gets no gradient); a non-finite gradient
    entry is clamped, as in the paper's code."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5)
    opt.step()
