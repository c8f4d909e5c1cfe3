"""LD3 (Tong et al., ICLR 2025, "Learning to Discretize Denoising Diffusion ODEs";
vinhsuhi/LD3): time steps learned by gradient descent through the student's solve.

The n steps are parametrised as softmax increments in log sigma (the reference's
`time_mode: lambda`): log sigma_i = log sigma_max - c_i log(sigma_max / sigma_min) with
c = cumsum(softmax(theta)) normalised to end at 1, so every schedule starts at sigma_max,
ends at sigma_min and decreases. theta starts at the solver's default schedule (polynomial
for d-solvers, log-SNR for D-solvers). A teacher (Heun, `teacher_steps` on the polynomial
grid) solves `samples` noises (the paper: ~100); the student (the search solver, the same
arithmetic as the registered sampler) solves the same noises with n steps and Adam lowers
|| student(x_T + sigma_max delta) - teacher(x_T) ||^2, summed over pixels, mean over samples.
LPIPS is not available offline, so the distance is the squared L2 (the paper's "L2" loss).
With `slack` > 0 each sample's delta is optimised too, projected on the ball
||delta|| <= slack sqrt(dim) (the paper's relaxed objective: the student need only reach the
teacher's output from a nearby noise); slack = 0 is plain output matching. The schedule of
lower full-set loss, the learned or the initial one, is kept.

`start` (not in the reference) moves the first sigma: `sigma_max` (the default, the
protocol's one sigma range), a fixed number in (sigma_min, sigma_max], or `search`, which
learns it with the steps: log sigma_start = log sigma_max - r, r >= 0 by Adam (`start_lr`)
projected on [0, log sqrt(sigma_max / sigma_min)] (so sigma_start >= sqrt(sigma_min
sigma_max)). The teacher still solves from sigma_max eps; the student starts from
sigma_start eps with the same eps, so the prior's mismatch at sigma_start (the data's
spread, absent from sigma_start eps) is part of the distance it lowers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench.errors import UsageError
from bench.solvers import heun_step

from .gits import polynomial
from .students import DATA_PREDICTION, solve

INITS = ("auto", "polynomial", "logsnr")
STARTS = ("sigma_max", "search")


def canonical_start(start, method: str = "ld3", allowed=STARTS) -> str:
    """`sigma_max`, `search` (where allowed) or a positive finite number written as Python's
    float repr (so start=20 and start=20.0 are one cache key)."""
    text = str(start).strip()
    if text in allowed:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{method} start must be {', '.join(allowed)} or a number > 0; got '{start}'")
    return repr(value)


def start_of(start: str, sigma_min: float, sigma_max: float, method: str = "ld3") -> float:
    """The first sigma (the top of the search for start=search), checked against the range."""
    if start in STARTS:
        return float(sigma_max)
    value = float(start)
    if not sigma_min < value <= sigma_max * (1 + 1e-9):
        raise UsageError(
            f"{method} start={start} is outside the model's sigma range ({sigma_min:g}, {sigma_max:g}]"
        )
    return min(value, float(sigma_max))


@dataclass(frozen=True)
class LD3Options:
    """How LD3 learns; every field is part of the cache key."""

    samples: int = 200  # teacher samples (the paper: ~100; 200 measured better on digits)
    batch: int = 25
    epochs: int = 16
    lr: float = 0.2  # Adam on theta (0.05 left the 5-step loss far from its optimum on digits)
    teacher_steps: int = 64  # Heun steps of the teacher, 2 calls each
    slack: float = 0.0
    init: str = "auto"
    seed: int = 20241012  # apart from run seeds
    start: str = "sigma_max"  # or "search", or a number: the first sigma
    start_lr: float = 0.5  # Adam on log sigma_start (start=search only)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise UsageError(f"ld3 init must be one of {', '.join(INITS)}; got '{self.init}'")
        if (
            min(self.samples, self.batch, self.epochs, self.teacher_steps) < 1
            or not self.lr > 0
            or self.slack < 0
        ):
            raise UsageError("ld3 needs samples, batch, epochs, teacher_steps >= 1, lr > 0 and slack >= 0")
        if not self.start_lr > 0:
            raise UsageError(f"ld3 start_lr must be > 0; got {self.start_lr}")
        object.__setattr__(self, "start", canonical_start(self.start))

    def to_json(self) -> dict:
        """The key's fields; start and start_lr only where they matter (start=sigma_max keeps
        the keys, and the committed fits, of the searches before the option existed)."""
        out = asdict(self)
        if self.start == "sigma_max":
            del out["start"]
        if self.start != "search":
            del out["start_lr"]
        return out


def schedule(theta: Tensor, sigma_min: float, sigma_max: float | Tensor) -> Tensor:
    """n + 1 sigmas from n logits: softmax increments in log sigma, exact ends. `sigma_max`
    may be a 0-d tensor (a learned start), through which the sigmas differentiate."""
    c = torch.cumsum(torch.softmax(theta, 0), 0)
    c = torch.cat([c.new_zeros(1), c / c[-1]])
    if isinstance(sigma_max, Tensor):
        log_top = torch.log(sigma_max.to(theta.dtype)).reshape(())
        top = torch.exp(log_top).reshape(1)
    else:
        log_top, top = math.log(sigma_max), theta.new_tensor([sigma_max])
    log_s = log_top + c * (math.log(sigma_min) - log_top)
    s = torch.exp(log_s)
    return torch.cat([top, s[1:-1], s.new_tensor([sigma_min])])


def init_theta(n: int, sigma_min: float, sigma_max: float, init: str, solver: str) -> Tensor:
    """Logits that reproduce the initial schedule: the log of its log-sigma increments."""
    kind = init if init != "auto" else ("logsnr" if solver in DATA_PREDICTION else "polynomial")
    if kind == "logsnr":
        return torch.zeros(n, dtype=torch.float64)
    s = polynomial(n + 1, sigma_min, sigma_max)
    return torch.log(torch.log(s[:-1] / s[1:]))


def teacher(model, x_T: Tensor, sigma_min: float, sigma_max: float, steps: int) -> Tensor:
    """Heun on the polynomial grid (rho = 7) from x_T down to sigma_min."""
    s = [float(v) for v in polynomial(steps + 1, sigma_min, sigma_max)]
    x = x_T
    with torch.no_grad():
        for i in range(steps):
            x = heun_step(model, x, s[i], s[i + 1])
    return x


def student(model, eps: Tensor, sigmas: Tensor, to_zero: bool, solver: str, solver_options) -> Tensor:
    """The search solver from sigmas[0] * eps along `sigmas` (then the denoise to 0 if asked)."""
    s = torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas
    return solve(model, eps * s[0].to(eps.dtype), s.to(eps.dtype), solver, solver_options)


def loss_of(x: Tensor, target: Tensor) -> Tensor:
    """Squared L2 per sample (summed over pixels)."""
    return (x.float() - target.float()).pow(2).flatten(1).sum(1)


def full_loss(model, eps, targets, sigmas, to_zero, solver, solver_options, batch) -> float:
    """The mean loss over every teacher sample, no gradient."""
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(eps), batch):
            x = student(model, eps[k : k + batch], sigmas, to_zero, solver, solver_options)
            total += float(loss_of(x, targets[k : k + batch]).sum())
    return total / len(eps)


def search(
    model,
    n: int,
    sigma_min: float,
    sigma_max: float,
    to_zero: bool,
    solver: str,
    solver_options,
    options: LD3Options,
    device,
) -> tuple[list[float], dict]:
    """LD3's n + 1 sigmas for the search solver, and the fit's statistics."""
    gen = torch.Generator().manual_seed(options.seed)
    eps = torch.randn(options.samples, *model.shape, generator=gen).to(device)
    # The teacher's outputs, batch by batch
    targets = torch.cat(
        [
            teacher(
                model, eps[k : k + options.batch] * sigma_max, sigma_min, sigma_max, options.teacher_steps
            )
            for k in range(0, options.samples, options.batch)
        ]
    )
    # The student's first sigma: sigma_max, a fixed start, or log sigma_max - r with r learned
    top = start_of(options.start, sigma_min, sigma_max)
    searched = options.start == "search"
    r_max = 0.5 * math.log(top / sigma_min)
    r = torch.zeros((), dtype=torch.float64, device=device, requires_grad=searched)

    def first() -> float | Tensor:
        return top * torch.exp(-r) if searched else top

    theta0 = init_theta(n, sigma_min, top, options.init, solver).to(device)
    theta = theta0.clone().requires_grad_(True)
    delta = torch.zeros_like(eps)
    radius = options.slack * math.sqrt(eps[0].numel())
    groups = [{"params": [theta], "lr": options.lr}]
    if searched:
        groups.append({"params": [r], "lr": options.start_lr})
    opt = torch.optim.Adam(groups)
    steps = options.epochs * math.ceil(options.samples / options.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(options.seed + 1)
    for _ in range(options.epochs):
        for idx in torch.randperm(options.samples, generator=order).split(options.batch):
            # The student's solve from the (shifted) noises, and its distance to the teacher
            d = delta[idx].clone().requires_grad_(radius > 0)
            wrt = [theta] + ([r] if searched else []) + ([d] if radius > 0 else [])
            with torch.enable_grad():
                sigmas = schedule(theta, sigma_min, first())
                x = student(model, eps[idx] + d, sigmas, to_zero, solver, solver_options)
                loss = loss_of(x, targets[idx]).mean()
                grads = list(torch.autograd.grad(loss, wrt))
            # Adam on the steps (and the start, projected on its range); a projected
            # gradient step on each sample's shift
            theta.grad = torch.nan_to_num(grads.pop(0), nan=0.0)
            torch.nn.utils.clip_grad_norm_([theta], 1.0)
            if searched:
                r.grad = torch.nan_to_num(grads.pop(0), nan=0.0)
            opt.step()
            sched.step()
            if searched:
                with torch.no_grad():
                    r.clamp_(0.0, r_max)
            if radius > 0:
                delta[idx] = project(delta[idx] - 0.25 * radius * unit(grads.pop(0)), radius)
    # Keep the better of the learned and the initial schedule on the whole teacher set
    start = float(r.detach().neg().exp() * top) if searched else top
    learned = schedule(theta.detach(), sigma_min, start)
    initial = schedule(theta0, sigma_min, top)
    args = (model, eps, targets)
    loss_learned = full_loss(*args, learned, to_zero, solver, solver_options, options.batch)
    loss_initial = full_loss(*args, initial, to_zero, solver, solver_options, options.batch)
    best = learned if loss_learned <= loss_initial else initial
    stats = {
        "loss_initial": loss_initial,
        "loss_learned": loss_learned,
        "kept": "learned" if best is learned else "initial",
        "start": float(best[0]),
    }
    return [float(s) for s in best.double().cpu()], stats


def unit(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (g.ndim - 1))


def project(delta: Tensor, radius: float) -> Tensor:
    """Each sample's shift onto the ball of `radius`."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1))
    return delta * torch.clamp(radius / norm, max=1.0)


def calls(options: LD3Options, n: int, to_zero: bool) -> list[tuple[int, int, float]]:
    """(network calls, batch size, cost factor) of the fit: the teacher (forward), the
    training steps (forward and backward, about 3 forward passes each) and the two final
    evaluations."""
    sizes = [min(options.batch, options.samples - k) for k in range(0, options.samples, options.batch)]
    m = n + int(to_zero)
    out = [(2 * options.teacher_steps, b, 1.0) for b in sizes]
    out += [(m, b, 3.0) for _ in range(options.epochs) for b in sizes]
    out += [(2 * m, b, 1.0) for b in sizes]
    return out
