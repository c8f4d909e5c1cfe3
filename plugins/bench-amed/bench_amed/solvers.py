"""AMED-Solver and AMED-Plugin in the sigma formulation (Zhou et al., CVPR 2024, "Fast
ODE-based Sampling for Diffusion Models in Around 5 Steps"; zju-pi/diff-sampler).

Every interval sigma_cur -> sigma_next costs two network calls: D at sigma_cur (replaced
on the first interval by the analytical first step, AFS, when asked) and D at the learned
intermediate point sigma_mid = sigma_next^r sigma_cur^(1 - r), evaluated at a * sigma_mid.

- AMED-Solver (the mean-value step): x_next = x_cur + c (sigma_next - sigma_cur) d_mid.
- AMED-Plugin: a base solver's own update applied twice, sigma_cur -> sigma_mid with the
  call at sigma_cur and sigma_mid -> sigma_next (scaled by c) with the call at sigma_mid;
  Euler, iPNDM (Adams-Bashforth on d) and DPM-Solver++(2M) (multistep on x0) are bases.

So NFE = 2 * intervals - [AFS]. The same `amed_interval` serves sampling and the fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bench.errors import UsageError
from bench.solvers import ADAMS_BASHFORTH, afs_d, dpmpp_step, to_d

from .predictor import AMEDPredictor, bottleneck_summary, midpoint


@dataclass
class Evaluation:
    """One evaluation at (x, sigma): x0 = D, d = (x - x0) / sigma, and the bottleneck summary."""

    x0: Tensor
    d: Tensor
    feature: Tensor | None = None


@dataclass
class History:
    """What a multistep base carries across its updates: recent outputs and their sigmas."""

    total: int  # updates in the whole solve (2 per interval)
    keep: int = 3
    outputs: list[Tensor] = field(default_factory=list)
    sigmas: list[Tensor] = field(default_factory=list)
    count: int = 0  # updates done so far

    def push(self, output: Tensor, sigma: Tensor) -> None:
        if self.keep == 0:
            return
        self.outputs = [*self.outputs, output][-self.keep :]
        self.sigmas = [*self.sigmas, torch.as_tensor(sigma)][-self.keep :]

    def detach(self) -> None:
        """Cut the autograd graph between fitted steps."""
        self.outputs = [o.detach() for o in self.outputs]
        self.sigmas = [s.detach() for s in self.sigmas]


def sigma_arg(sigma: Tensor) -> Tensor:
    """A sigma of shape [B, 1, 1, 1] or [1, 1, 1, 1] as the Denoiser takes it: [B] or 0-dim."""
    return sigma.reshape(-1) if sigma.numel() > 1 else sigma.reshape(())


def evaluate(model, x: Tensor, sigma: Tensor, at: Tensor | None = None, feature: bool = False) -> Evaluation:
    """D(x, at or sigma) and d with respect to sigma; with `feature` the same call's bottleneck."""
    s_in = sigma_arg(torch.as_tensor(at if at is not None else sigma))
    if feature:
        x0, raw = model(x, s_in, return_bottleneck=True)
        return Evaluation(x0, to_d(x, sigma, x0), bottleneck_summary(raw))
    x0 = model(x, s_in)
    return Evaluation(x0, to_d(x, sigma, x0))


def analytical_first_step(x: Tensor, sigma: Tensor, predictor: AMEDPredictor | None) -> Evaluation:
    """AFS (Zhou et al. 2024): d = x / sqrt(1 + sigma^2) without a network call; zero bottleneck."""
    d = afs_d(x, sigma)
    feature = None
    if predictor is not None and predictor.uses_bottleneck:
        feature = x.new_zeros(len(x), predictor.config.feature_dim)
    return Evaluation(x - sigma * d, d, feature)


# --- Bases ----------------------------------------------------------------------------


class AMEDSolver:
    """AMED-Solver: Euler to sigma_mid, then the mean-value step from x_cur with d_mid."""

    multistep = False  # the fit starts each interval from the teacher's point

    def history(self, intervals: int) -> History:
        return History(total=2 * intervals, keep=0)

    def first(self, x, cur: Evaluation, sigma_cur, sigma_mid, hist: History) -> Tensor:
        return x + (sigma_mid - sigma_cur) * cur.d

    def second(self, x, x_mid, mid: Evaluation, sigma_cur, sigma_mid, sigma_next, c, hist) -> Tensor:
        return x + c * (sigma_next - sigma_cur) * mid.d


class PluginBase:
    """AMED-Plugin: the base's `update` applied to sigma_mid, then (scaled by c) to sigma_next."""

    keep = 0
    multistep = False

    def history(self, intervals: int) -> History:
        return History(total=2 * intervals, keep=self.keep)

    def first(self, x, cur: Evaluation, sigma_cur, sigma_mid, hist: History) -> Tensor:
        return self._apply(x, cur, sigma_cur, sigma_mid, hist, 1.0)

    def second(self, x, x_mid, mid: Evaluation, sigma_cur, sigma_mid, sigma_next, c, hist) -> Tensor:
        return self._apply(x_mid, mid, sigma_mid, sigma_next, hist, c)

    def _apply(self, x, ev, sigma_from, sigma_to, hist, scale) -> Tensor:
        out = self.update(x, ev, sigma_from, sigma_to, hist, scale)
        hist.count += 1
        return out

    def update(self, x, ev: Evaluation, sigma_from, sigma_to, hist: History, scale) -> Tensor:
        raise NotImplementedError


class EulerPlugin(PluginBase):
    """Euler: x_to = x + scale (sigma_to - sigma_from) d."""

    def update(self, x, ev, sigma_from, sigma_to, hist, scale) -> Tensor:
        return x + scale * (sigma_to - sigma_from) * ev.d


class IPNDMPlugin(PluginBase):
    """iPNDM: Adams-Bashforth on d with the newest `max_order - 1` derivatives, warm-started."""

    multistep = True  # the fit chains the student's own outputs and history

    def __init__(self, max_order: int = 2) -> None:
        if not 1 <= max_order <= 4:
            raise UsageError(f"iPNDM max_order must be 1 to 4; got {max_order}")
        self.max_order, self.keep = max_order, max_order - 1

    def update(self, x, ev, sigma_from, sigma_to, hist, scale) -> Tensor:
        # Combine d with the stored derivatives, newest first
        coeffs = ADAMS_BASHFORTH[min(self.max_order, len(hist.outputs) + 1)]
        d_ab = coeffs[0] * ev.d + sum(k * d for k, d in zip(coeffs[1:], hist.outputs[::-1], strict=False))
        hist.push(ev.d, sigma_from)
        return x + scale * (sigma_to - sigma_from) * d_ab


class DPMPP2MPlugin(PluginBase):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, exact in lambda = -log sigma.

    Order 1 on the first update and, with `lower_order_final`, on the last one.
    """

    keep = 2
    multistep = True

    def __init__(self, lower_order_final: bool = True) -> None:
        self.lower_order_final = lower_order_final

    def update(self, x, ev, sigma_from, sigma_to, hist, scale) -> Tensor:
        # Store x0 at sigma_from, then pick the order this update can use
        hist.push(ev.x0, sigma_from)
        k = hist.count + 1
        order = min(2, len(hist.outputs), k)
        if self.lower_order_final:
            order = min(order, hist.total - k + 1)
        # DPM-Solver++ of that order on the stored data predictions, c scaling the update
        return dpmpp_step(x, sigma_to, hist.sigmas[-order:], hist.outputs[-order:], scale=scale)


def make_base(name: str, options: dict[str, Any]):
    """The base of sampler `name` with its options."""
    if name == "amed":
        return AMEDSolver()
    if name == "euler":
        return EulerPlugin()
    if name == "ipndm":
        return IPNDMPlugin(int(options.get("max_order", 2)))
    if name == "dpm++2m":
        return DPMPP2MPlugin(bool(options.get("lower_order_final", True)))
    raise UsageError(f"unknown AMED base '{name}'; use amed, euler, ipndm or dpm++2m")


# --- One interval, and the whole solve --------------------------------------------------


def amed_interval(model, x, sigma_cur, sigma_next, base, predictor, hist: History, afs: bool) -> Tensor:
    """One AMED interval sigma_cur -> sigma_next: two calls (one with AFS)."""
    # Evaluate at sigma_cur: the network (with its bottleneck if the predictor reads it) or AFS
    if afs:
        cur = analytical_first_step(x, sigma_cur, predictor)
    else:
        cur = evaluate(model, x, sigma_cur, feature=predictor is not None and predictor.uses_bottleneck)
    # The learned intermediate point and scales
    r, c, a = predictor(cur.feature, sigma_cur, sigma_next) if predictor is not None else midpoint(x.device)
    sigma_mid = sigma_next**r * sigma_cur ** (1 - r)
    # Base update to sigma_mid, the call at a * sigma_mid, base update to sigma_next
    x_mid = base.first(x, cur, sigma_cur, sigma_mid, hist)
    mid = evaluate(model, x_mid, sigma_mid, at=a * sigma_mid)
    return base.second(x, x_mid, mid, sigma_cur, sigma_mid, sigma_next, c, hist)


@torch.no_grad()
def sample_amed(
    model,
    x,
    sigmas,
    *,
    base: str,
    fitted_predictor: AMEDPredictor | None = None,
    afs: bool = False,
    noise=None,
    callback=None,
    **options,
) -> Tensor:
    """AMED over the schedule (ending at sigma_min > 0); NFE = 2 * intervals - [AFS].

    `fitted_predictor` comes from the prepare stage; without it (an unprepared call) every
    interval takes r = 1/2, c = a = 1.
    """
    if float(sigmas[-1]) <= 0:
        raise UsageError("AMED intervals end at sigma_min > 0; use a schedule without the final 0")
    solver = make_base(base, options)
    hist = solver.history(len(sigmas) - 1)
    predictor = fitted_predictor.to(x.device) if fitted_predictor is not None else None
    if predictor is not None and predictor.uses_bottleneck and not getattr(model, "has_bottleneck", False):
        # A modifier may hide the bottleneck (or change the resolution): fail this cell alone
        raise RuntimeError(
            "the AMED predictor reads the UNet bottleneck, which the model as modified does not "
            "expose; use the sampler option predictor=sigma-only"
        )
    for i in range(len(sigmas) - 1):
        # One interval: two calls, the first replaced by AFS on the first interval when asked
        x = amed_interval(model, x, sigmas[i], sigmas[i + 1], solver, predictor, hist, afs and i == 0)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i]})
    return x
