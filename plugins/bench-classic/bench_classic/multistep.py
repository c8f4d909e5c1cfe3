"""Multistep samplers: one network call per step, earlier calls reused for higher order.

In the sigma formulation (alpha = 1) lambda = -log sigma, so a step sigma_s -> sigma_t has
h = log(sigma_s / sigma_t); data predictions m_i = D(x_i, sigma_i) or slopes d_i are kept
in a short history. Warm-up uses lower orders; a step to sigma = 0 is the denoise
x = D(x, sigma). The papers' formulas are evaluated on coefficient vectors over the
history (numpy, double precision); the tensors are then combined in one fused pass each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from bench import Denoiser
from bench.solvers import ADAMS_BASHFORTH, dpmpp_step, to_d, unipc_coefficients

from .samplers import denoise, floats, report
from .schedules import vp_fit, vp_time


def step_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """Order of step i of `steps`: warm-up (i + 1 values known) and, optionally, lower order
    on the last steps (Lu et al. 2022b; the step to sigma = 0 is then first order)."""
    k = min(order, i + 1)
    return min(k, steps - i) if lower_order_final else k


def lincomb(terms: Iterable[tuple[float, Tensor]]) -> Tensor:
    """sum of coefficient * tensor over (coefficient, tensor) pairs, one fused pass per
    tensor; the first tensor sets dtype and device."""
    (c0, v0), *rest = terms
    out = v0 * float(c0)
    for c, v in rest:
        out.add_(v, alpha=float(c))
    return out


# --- DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling") -----


@torch.no_grad()
def sample_dpmpp(
    model,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    order=2,
    lower_order_final=True,
    afs=False,
    d2="reference",
    **_,
) -> Tensor:
    """DPM-Solver++(2M) / (3M) (Lu et al. 2022b): multistep, data prediction, 1 NFE per step."""
    s = floats(sigmas)
    ms: list[Tensor] = []
    for i in range(len(s) - 1):
        # Evaluate at the new point and keep the last `order` predictions
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        ms = (ms + [denoised])[-order:]
        # Step: the denoise to 0, or a multistep update of the allowed order
        if s[i + 1] == 0:
            x = denoised
        else:
            k = step_order(order, i, len(s) - 1, lower_order_final)
            x = dpmpp_step(x, s[i + 1], s[: i + 1][-k:], ms[-k:], d2)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint", **_
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; k-diffusion's sample_dpmpp_2m_sde): the
    second-order multistep update of the SDE, fresh noise each step; 1 NFE per step."""
    s = floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        if s[i + 1] == 0:
            # Denoise to 0
            x = denoised
        else:
            # First-order SDE step: decay and data term
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            terms = [(s[i + 1] / s[i] * math.exp(-eta_h), x), (-math.expm1(-h - eta_h), denoised)]
            # Second-order correction from the previous data prediction
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = -math.expm1(-h - eta_h) / (-h - eta_h) + 1
                else:
                    c = -0.5 * math.expm1(-h - eta_h)
                terms += [(c / r, denoised), (-c / r, old_denoised)]
            # Fresh noise of the SDE's variance over the step
            if eta > 0:
                terms.append((s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise, noise()))
            x = lincomb(terms)
            h_last = h
        old_denoised = denoised
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


# --- UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework") ----------


def unipc_system(h: float, rks: list[float], variant: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """h phi_1(-h), B(h) and UniPC's order conditions R rho = b for the ratios `rks`
    (the last being 1); B(h) = -h (bh1) or e^(-h) - 1 (bh2) (Zhao et al. 2023, Sec. 3.3)."""
    h_phi_1, b_h, b = unipc_coefficients(h, len(rks), variant)
    R = np.vander(np.asarray(rks, dtype=np.float64), increasing=True).T
    return h_phi_1, b_h, R, np.asarray(b)


def unipc_update(
    x: Tensor, sigma_t: float, sigmas: list[float], ms: list[Tensor], variant: str, m_t: Tensor | None = None
) -> Tensor:
    """UniP (m_t None) or UniC (m_t = D at the predicted point) of order len(ms) from the
    last points `sigmas`, `ms` (newest last), data prediction (Zhao et al. 2023, Alg. 2-3)."""
    sigma_s0 = sigmas[-1]
    tensors = [*reversed(ms), *([m_t] if m_t is not None else [])]
    m = np.eye(len(tensors))  # m[0] = m0, then the older predictions, then m_t, as coefficients
    h = math.log(sigma_s0 / sigma_t)
    # Scaled differences to the older predictions
    rks = [math.log(sigma_s0 / sigma_k) / h for sigma_k in reversed(sigmas[:-1])]
    D1s = [(m[k] - m[0]) / r for k, r in enumerate(rks, start=1)]
    h_phi_1, b_h, R, b = unipc_system(h, rks + [1.0], variant)
    coeff = -h_phi_1 * m[0]
    if m_t is None and D1s:
        # Predictor: the order conditions without the new point
        rhos = [0.5] if len(D1s) == 1 else np.linalg.solve(R[:-1, :-1], b[:-1])
        coeff = coeff - b_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s, strict=True))
    elif m_t is not None:
        # Corrector: the new point's prediction enters with the last coefficient
        rhos = [0.5] if not D1s else np.linalg.solve(R, b)
        D1_t = m[-1] - m[0]
        coeff = coeff - b_h * sum(rho * D1 for rho, D1 in zip(rhos, [*D1s, D1_t], strict=True))
    return lincomb([(sigma_t / sigma_s0, x), *zip(coeff, tensors, strict=True)])


@torch.no_grad()
def sample_unipc(
    model,
    x,
    sigmas,
    *,
    noise=None,
    callback=None,
    order=3,
    variant="bh2",
    lower_order_final=True,
    afs=False,
    **_,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep UniP predictor, and the UniC corrector, which reuses
    the next step's evaluation (skipped after the last step); 1 NFE per step."""
    s = floats(sigmas)
    ms: list[Tensor] = []
    x_last, k_last = x, 0
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        # Corrector for the step that landed here, with this evaluation
        if k_last and s[i + 1] > 0:
            x = unipc_update(x_last, s[i], s[:i][-k_last:], ms[-k_last:], variant, m_t=denoised)
        ms = (ms + [denoised])[-order:]
        # Predictor to the next point, or the denoise to 0
        if s[i + 1] == 0:
            x = denoised
        else:
            k_last = step_order(order, i, len(s) - 1, lower_order_final)
            x_last, x = x, unipc_update(x, s[i + 1], s[: i + 1][-k_last:], ms[-k_last:], variant)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


# --- Adams-Bashforth on the slope d: iPNDM and DEIS (Zhang & Chen 2023) --------------------


def adams_bashforth(
    model: Denoiser,
    x: Tensor,
    s: list[float],
    order: int,
    afs: bool,
    callback: Callable | None,
    weights: Callable[[int, int], list[float]],
) -> Tensor:
    """The linear multistep loop of iPNDM and DEIS: x_next = x + sum_j w_j d_(i-j) over the
    last `order` slopes d = (x - D) / sigma, newest first; `weights(i, k)` gives step i's k
    weights (fewer during warm-up). A step to sigma = 0 is the denoise."""
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        ds = ([to_d(x, s[i], denoised)] + ds)[:order]
        # Multistep update of the available order, or the denoise to 0
        if s[i + 1] == 0:
            x = denoised
        else:
            x = lincomb([(1.0, x), *zip(weights(i, len(ds)), ds, strict=True)])
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_ipndm(model, x, sigmas, *, noise=None, callback=None, order=4, afs=False, **_) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator"; diff-sampler's form): Adams-Bashforth with the fixed equal-step coefficients
    on d = (x - D) / sigma, warm-started with lower orders; 1 NFE per step."""
    s = floats(sigmas)
    weights = lambda i, k: [(s[i + 1] - s[i]) * c for c in ADAMS_BASHFORTH[k]]  # noqa: E731
    return adams_bashforth(model, x, s, order, afs, callback, weights)


def lagrange_integrals(
    nodes: list[float], sigma_s: float, sigma_t: float, time: Callable, points: int = 24
) -> list[float]:
    """int_{sigma_s}^{sigma_t} l_j(time(sigma)) dsigma for the Lagrange basis l_j on `nodes`,
    by Gauss-Legendre quadrature in sigma (exact for a polynomial in sigma)."""
    u, w = np.polynomial.legendre.leggauss(points)
    sig = (sigma_s + sigma_t) / 2 + (sigma_t - sigma_s) / 2 * u
    tau, w = time(sig), w * (sigma_t - sigma_s) / 2
    out = []
    for j, tj in enumerate(nodes):
        basis = np.prod([(tau - tk) / (tj - tk) for k, tk in enumerate(nodes) if k != j], axis=0)
        out.append(float(np.sum(w * basis)))
    return out


@torch.no_grad()
def sample_deis(
    model, x, sigmas, *, noise=None, callback=None, order=4, mode="tab", afs=False, **_
) -> Tensor:
    """DEIS (Zhang & Chen 2023): the slope d (= eps) extrapolated by a polynomial through the
    last `order` values, in VP time t (tAB; t fitted to the model's sigma range as in
    diff-sampler) or in sigma itself (rhoAB), and integrated exactly; 1 NFE per step.
    order = 4 is the paper's tAB3."""
    s = floats(sigmas)
    beta_d, beta_min = vp_fit(model.sigma_min, model.sigma_max)
    time = (lambda sig: vp_time(sig, beta_d, beta_min)) if mode == "tab" else (lambda sig: sig)

    def weights(i: int, k: int) -> list[float]:
        # Lagrange basis through the last k points, newest first, integrated over the step
        return lagrange_integrals([time(sig) for sig in s[i::-1][:k]], s[i], s[i + 1], time)

    return adams_bashforth(model, x, s, order, afs, callback, weights)
