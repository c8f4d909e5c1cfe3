"""What samplers share: the pieces more than one solver family is built from.

In the sigma formulation (Karras et al. 2022), x = x0 + sigma * eps, d = (x - D) / sigma
is dx/dsigma of the probability-flow ODE and lambda = -log sigma. Sigmas may be Python
floats (coefficients in double precision, as bench-classic computes them) or tensors
(which a fitted solver such as AMED differentiates through). Plugins import these from
`bench.solvers`; none imports another plugin's package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .contracts import Plan
from .errors import Infeasible, UsageError

# Adams-Bashforth coefficients on an equal grid, newest slope first (iPNDM, Zhang & Chen 2023)
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def to_d(x: Tensor, sigma: float | Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def afs_d(x: Tensor, sigma: float | Tensor) -> Tensor:
    """The analytical first step (Zhou et al. 2024, AMED): d = x / sqrt(1 + sigma^2), the
    slope of a model whose data is a point at 0 with unit-variance noise, no network call."""
    if isinstance(sigma, Tensor):
        return x / (1 + sigma**2).sqrt()
    return x / math.sqrt(1 + sigma**2)


def _log(v: float | Tensor) -> float | Tensor:
    return v.log() if isinstance(v, Tensor) else math.log(v)


def _expm1(v: float | Tensor) -> float | Tensor:
    return torch.expm1(v) if isinstance(v, Tensor) else math.expm1(v)


def dpmpp_coefficients(
    sigma_t: float | Tensor, sigmas: Sequence[float | Tensor], d2: str = "reference"
) -> tuple[Any, list[Any]]:
    """Multistep DPM-Solver++ (Lu et al. 2022b, Algorithm 2 and its third-order form) in data
    prediction, order len(sigmas) (1-3): x_t = a x + sum_j b_j m_j over the last data
    predictions m_j at `sigmas` (newest last). Returns (a, [b_j], newest last).

    The reference code's third-order term is phi_3 * D2 with D2 ~ h^2 m''/2, half of what
    integrates a quadratic m exactly, so it is second order asymptotically; d2="taylor"
    doubles it (the factor the singlestep 'taylor' update has), giving third order."""
    order = len(sigmas)
    sigma_s0 = sigmas[-1]
    h = _log(sigma_s0 / sigma_t)
    phi_1 = _expm1(-h)
    if order == 1:
        return sigma_t / sigma_s0, [-phi_1]
    # First divided difference of the data predictions, in units of h
    r0 = _log(sigmas[-2] / sigma_s0) / h
    if order == 2:  # -phi_1 (m0 + (m0 - m1) / (2 r0))
        return sigma_t / sigma_s0, [phi_1 / (2 * r0), -phi_1 * (1 + 1 / (2 * r0))]
    # Third order: a second divided difference replaces the midpoint term
    r1 = _log(sigmas[-3] / sigmas[-2]) / h
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    k3 = 2 if d2 == "taylor" else 1
    # m0, m1, m2 in D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
    d10 = (1 / r0, -1 / r0, 0.0)
    d11 = (0.0, 1 / r1, -1 / r1)
    w = r0 / (r0 + r1)
    coeff = [
        (-phi_1 if j == 0 else 0.0)
        + phi_2 * (d10[j] + w * (d10[j] - d11[j]))
        - k3 * phi_3 * (d10[j] - d11[j]) / (r0 + r1)
        for j in range(3)
    ]
    return sigma_t / sigma_s0, coeff[::-1]


def combine(a: Any, x: Tensor, coeffs: Sequence[Any], ms: Sequence[Tensor]) -> Tensor:
    """a x + sum_j b_j m_j: one fused pass per tensor for float coefficients, plain (and
    differentiable) arithmetic for tensor ones."""
    pairs = list(zip(coeffs, ms, strict=True))[::-1]  # newest first
    if all(not isinstance(c, Tensor) for c in (a, *coeffs)):
        out = x * float(a)
        for c, m in pairs:
            out.add_(m, alpha=float(c))
        return out
    return a * x + sum(c * m for c, m in pairs)


def dpmpp_step(
    x: Tensor, sigma_t: float | Tensor, sigmas: Sequence[float | Tensor], ms: Sequence[Tensor],
    d2: str = "reference", scale: float | Tensor = 1.0,
) -> Tensor:
    """One multistep DPM-Solver++ update to sigma_t from the last data predictions `ms` at
    `sigmas` (newest last); `scale` multiplies the data-prediction part (AMED's c)."""
    a, b = dpmpp_coefficients(sigma_t, sigmas, d2)
    if not (isinstance(scale, float | int) and scale == 1):
        b = [scale * c for c in b]
    return combine(a, x, b, ms)


def unipc_coefficients(h: float | Tensor, order: int, variant: str) -> tuple[Any, Any, list[Any]]:
    """UniPC's coefficients for a step of log-sigma length h (Zhao et al. 2023, Sec. 3.3):
    h phi_1(-h) = e^(-h) - 1, B(h) (-h for bh1, e^(-h) - 1 for bh2) and the right-hand side
    b_k = k! (-h) phi_(k+1)(-h) / B(h), k = 1..order, of its order conditions R rho = b."""
    hh = -h
    h_phi_1 = _expm1(hh)
    b_h = hh if variant == "bh1" else _expm1(hh)
    # The h phi_k(-h) recursion
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def heun_step(model, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor | None = None) -> Tensor:
    """One step of Heun's method (EDM Algorithm 1): Euler, then the trapezoidal correction,
    which the step to sigma = 0 skips (EDM's final Euler step); 2 calls, 1 to 0."""
    d_cur = to_d(x, sigma, model(x, sigma) if denoised is None else denoised)
    x_next = x + (sigma_next - sigma) * d_cur
    if sigma_next > 0:
        d_prime = to_d(x_next, sigma_next, model(x_next, sigma_next))
        x_next = x + (sigma_next - sigma) * (d_cur + d_prime) / 2
    return x_next


def euler_step(model, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor | None = None) -> Tensor:
    """One Euler step on the probability-flow ODE; 1 call."""
    return x + (sigma_next - sigma) * to_d(x, sigma, model(x, sigma) if denoised is None else denoised)


# --- Budgets ---------------------------------------------------------------------------

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def switch(options: Mapping[str, Any], key: str) -> bool | None:
    """An auto/true/false option: None for auto."""
    value = options.get(key, False)
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text == "auto":
        return None
    if text in TRUE + FALSE:
        return text in TRUE
    raise UsageError(f"option {key}={value}: use auto, true or false")


def plan_steps(nfe: int, options: Mapping[str, Any], cost: int = 1) -> Plan:
    """Steps for a method step of `cost` NFE: NFE = cost * core steps + denoise_to_zero - afs.

    With denoise_to_zero the schedule ends at 0 and its last step is one denoise
    D(x, sigma_min) (EDM's final Euler step); AFS saves the first call; afs=auto uses it only
    where the parity needs it. A budget no setting reaches raises Infeasible with the rule."""
    dtz = bool(options.get("denoise_to_zero", True))
    has_afs = "afs" in options
    afs = switch(options, "afs") if has_afs else False
    for use_afs in [False, True] if afs is None else [afs]:
        core, rest = divmod(nfe - dtz + use_afs, cost)
        if rest == 0 and core >= use_afs and core + dtz >= 1:
            return Plan(steps=core + dtz, nfe=nfe, to_zero=dtz, options={"afs": use_afs} if has_afs else {})
    rule = f"{cost} * steps" + (" - 1 (the step to 0 costs 1)" if dtz and cost > 1 else "")
    rule += " - 1 (AFS)" if afs else ""
    hint = "; afs=auto reaches it" if afs is not None and has_afs else ""
    raise Infeasible(
        f"with afs={options.get('afs', False)}, denoise_to_zero={dtz} this sampler spends "
        f"NFE = {rule}: {nfe} is not of that form{hint}"
    )
