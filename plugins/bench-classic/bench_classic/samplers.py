"""Classic samplers in the sigma formulation (Karras et al. 2022; k-diffusion's style).

Every sampler takes the Denoiser D, the initial x = sigma_0 * eps, the schedule `sigmas`
and returns x0. d = (x - D(x, sigma)) / sigma is the probability-flow ODE's derivative
dx/dsigma. The harness counts network calls; samplers only make them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic move to sigma_down plus noise of sigma_up.

    sigma_up^2 = eta^2 sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2, which is DDIM's
    sigma_eta written on the sigma axis (eta = 0 gives DDIM, eta = 1 DDPM-like ancestral).
    """
    if sigma_to == 0 or eta == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


@torch.no_grad()
def sample_euler(model, x, sigmas, *, noise=None, callback=None, **_) -> Tensor:
    """Euler's method on the probability-flow ODE; 1 NFE per step."""
    for i in range(len(sigmas) - 1):
        # One Euler step from sigma_i to sigma_{i+1}
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        x = x + (sigmas[i + 1] - sigmas[i]) * d
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, noise=None, callback=None, **_) -> Tensor:
    """Heun's 2nd-order method, EDM Algorithm 1 (deterministic); 2 NFE per step, except a
    step to sigma = 0, which is Euler (1 NFE): NFE = 2 * steps - 1 when ending at 0."""
    for i in range(len(sigmas) - 1):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        # Euler predictor
        d_cur = to_d(x, sigma_cur, model(x, sigma_cur))
        x_next = x + (sigma_next - sigma_cur) * d_cur
        # Trapezoidal corrector, skipped on the final step to 0
        if sigma_next > 0:
            d_next = to_d(x_next, sigma_next, model(x_next, sigma_next))
            x_next = x + (sigma_next - sigma_cur) * (d_cur + d_next) / 2
        x = x_next
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma_cur})
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, *, noise=None, callback=None, eta=0.0, **_) -> Tensor:
    """DDIM (Song et al. 2021) on the sigma axis; eta > 0 adds fresh noise (eta = 1: ancestral).

    With x = x_vp / sqrt(alpha_bar), DDIM's update is an Euler step to sigma_down followed
    by noise of std sigma_up (see `ancestral_step`); eta = 0 is exactly Euler. 1 NFE per step.
    """
    for i in range(len(sigmas) - 1):
        sigma_down, sigma_up = ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        # Deterministic move to sigma_down along the current x0 estimate
        denoised = model(x, sigmas[i])
        x = x + (sigma_down - sigmas[i]) * to_d(x, sigmas[i], denoised)
        # Stochastic part: fresh per-sample noise
        if sigma_up > 0:
            x = x + noise() * sigma_up
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x
