"""Single-step samplers in the sigma formulation (Karras et al. 2022; k-diffusion's style).

Every sampler takes the Denoiser D, the initial x = sigma_0 * eps, the schedule `sigmas`
and returns x0. d = (x - D(x, sigma)) / sigma is the probability-flow ODE's derivative
dx/dsigma, which is also the eps-prediction of a VP model. A step to sigma = 0 is the
denoise x = D(x, sigma) (EDM's final Euler step). The harness counts network calls;
samplers only make them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from bench import Denoiser, NoiseFn
from bench.solvers import afs_d, to_d


def floats(sigmas: Tensor | list[float]) -> list[float]:
    """The schedule as Python floats: step coefficients are computed in double precision."""
    return [float(s) for s in sigmas]


def denoise(model: Denoiser, x: Tensor, sigma: float, afs: bool = False) -> Tensor:
    """D(x, sigma); with AFS, the analytical first step of Zhou et al. (2024, AMED):
    d = x / sqrt(1 + sigma^2), i.e. D = x - sigma d, and no network call. Samplers pass
    `afs is True` on their first step: an undecided afs="auto" (no planner) means no AFS."""
    if afs:
        return x - sigma * afs_d(x, sigma)
    return model(x, sigma)


def report(
    callback: Callable | None, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor
) -> None:
    """Hand the state after step i to the caller's callback (k-diffusion's convention)."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def raise_noise(
    model: Denoiser,
    x: Tensor,
    sigma: float,
    n: int,
    noise: NoiseFn | None,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    **_,
) -> tuple[Tensor, float]:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2, lines 4-6): raise the noise
    level to sigma_hat = sigma (1 + gamma) with fresh noise; gamma = min(S_churn / N, sqrt 2 - 1)
    inside [S_tmin, S_tmax], else 0."""
    gamma = min(churn / n, math.sqrt(2) - 1) if churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = float(model.round_sigma(torch.tensor(sigma * (1 + gamma))))
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise(), sigma_hat


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic move to sigma_down plus noise of sigma_up.

    sigma_up^2 = eta^2 sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2 is DDIM's sigma_eta
    (Song et al. 2021, eq. 16) on the sigma axis: eta = 0 is DDIM, eta = 1 DDPM-like ancestral.
    """
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


@torch.no_grad()
def sample_euler(model, x, sigmas, *, noise=None, callback=None, afs=False, **churn) -> Tensor:
    """Euler's method on the probability-flow ODE, with EDM's optional churn (Karras et al.
    2022, Algorithm 2 with a first-order step); 1 NFE per step."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        # Churn: move up to sigma_hat with fresh noise (a no-op when churn = 0)
        x, sigma_hat = raise_noise(model, x, s[i], len(s) - 1, noise, **churn)
        # Euler step from sigma_hat to sigma_next
        denoised = denoise(model, x, sigma_hat, afs is True and i == 0)
        x = x + (s[i + 1] - sigma_hat) * to_d(x, sigma_hat, denoised)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, noise=None, callback=None, afs=False, **churn) -> Tensor:
    """Heun's 2nd-order method, EDM (Karras et al. 2022) Algorithm 1, and Algorithm 2 with
    churn; 2 NFE per step, except the step to sigma = 0, which is Euler's (1 NFE)."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        sigma_next = s[i + 1]
        # Churn: move up to sigma_hat with fresh noise (a no-op when churn = 0)
        x_hat, sigma_hat = raise_noise(model, x, s[i], len(s) - 1, noise, **churn)
        # Euler step from sigma_hat to sigma_next
        denoised = denoise(model, x_hat, sigma_hat, afs is True and i == 0)
        d_cur = to_d(x_hat, sigma_hat, denoised)
        x = x_hat + (sigma_next - sigma_hat) * d_cur
        # Trapezoidal correction, skipped on the step to 0
        if sigma_next > 0:
            d_prime = to_d(x, sigma_next, model(x, sigma_next))
            x = x_hat + (sigma_next - sigma_hat) * (d_cur + d_prime) / 2
        report(callback, i, x, s[i], sigma_next, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, **_
) -> Tensor:
    """Euler ancestral (k-diffusion), which is DDIM (Song et al. 2021) on the sigma axis: an
    Euler step to sigma_down, then fresh noise of std sigma_up; eta = 0 is deterministic
    DDIM (= Euler), eta = 1 ancestral sampling. 1 NFE per step."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        # Deterministic move to sigma_down along the current x0 estimate
        denoised = model(x, s[i])
        x = x + (sigma_down - s[i]) * to_d(x, s[i], denoised)
        # Stochastic part: fresh per-sample noise
        if sigma_up > 0:
            x = x + noise() * s_noise * sigma_up
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


def dpm_solver_step(
    model: Denoiser,
    x: Tensor,
    sigma_s: float,
    sigma_t: float,
    eps_s: Tensor,
    order: int,
    r1: float = 1 / 3,
    r2: float = 2 / 3,
) -> Tensor:
    """One DPM-Solver-k step (Lu et al. 2022, Algorithms 4-5, noise prediction) written with
    alpha = 1: h = log(sigma_s / sigma_t), intermediate points uniform in log sigma."""
    h = math.log(sigma_s / sigma_t)
    if order == 1:
        # DPM-Solver-1 is DDIM / Euler
        return x + (sigma_t - sigma_s) * eps_s
    if order == 2:
        # DPM-Solver-2: Euler to the log-midpoint, then the full step with its slope
        sigma_mid = math.sqrt(sigma_s * sigma_t)
        u = x + (sigma_mid - sigma_s) * eps_s
        return x + (sigma_t - sigma_s) * to_d(u, sigma_mid, model(u, sigma_mid))
    # DPM-Solver-3: stages at r1 h and r2 h
    sigma_1, sigma_2 = sigma_s * math.exp(-r1 * h), sigma_s * math.exp(-r2 * h)
    u1 = x + (sigma_1 - sigma_s) * eps_s
    d1 = to_d(u1, sigma_1, model(u1, sigma_1)) - eps_s
    phi_2 = math.expm1(r2 * h) / (r2 * h) - 1
    u2 = x + (sigma_2 - sigma_s) * eps_s - sigma_2 * (r2 / r1) * phi_2 * d1
    d2 = to_d(u2, sigma_2, model(u2, sigma_2)) - eps_s
    return x + (sigma_t - sigma_s) * eps_s - sigma_t / r2 * (math.expm1(h) / h - 1) * d2


@torch.no_grad()
def sample_dpm_solver(
    model, x, sigmas, *, noise=None, callback=None, order=2, orders=None, afs=False, **_
) -> Tensor:
    """Singlestep DPM-Solver-2/3 (Lu et al. 2022) on the probability-flow ODE; `orders` gives
    each step's order (DPM-Solver-fast: third-order steps, then a second/first-order one to
    meet the budget). A step of order k costs k NFE, the step to sigma = 0 one."""
    s = floats(sigmas)
    orders = list(orders) if orders is not None else [order] * (len(s) - 1)
    for i in range(len(s) - 1):
        # The slope at the start of the step (analytical with AFS)
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        if s[i + 1] == 0:
            x = denoised
        else:
            x = dpm_solver_step(model, x, s[i], s[i + 1], to_d(x, s[i], denoised), orders[i])
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x
