"""Ancestral samplers: a deterministic move to sigma_down, then fresh noise of std sigma_up.

A step sigma -> sigma_next first solves the probability-flow ODE from sigma to a lower
level sigma_down, then adds noise so that the marginal noise level is sigma_next again:
sigma_down^2 + sigma_up^2 = sigma_next^2. The levels come from `ancestral_step` (DDIM's
sigma_eta; eta = 0 is the plain ODE solver) or, for DDPM, from the posterior
q(x_next | x, x0). The deterministic move is Euler's (DDPM), DPM-Solver-2's (k-diffusion's
sample_dpm_2_ancestral) or DPM-Solver++(2S)'s (sample_dpmpp_2s_ancestral). All noise comes
from the `noise` stream; a step to sigma = 0 is the denoise x = D(x, sigma).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bench import Denoiser, NoiseFn, Plan
from bench.errors import UsageError

from . import budgets
from .multistep import lincomb
from .samplers import ancestral_step, denoise, dpm_solver_step, floats, report, to_d

# (sigma, sigma_next) -> (sigma_down, sigma_up)
Levels = Callable[[float, float], tuple[float, float]]
# (model, x, sigma, sigma_down, denoised) -> x at sigma_down
Move = Callable[[Denoiser, Tensor, float, float, Tensor], Tensor]


def ancestral(
    model: Denoiser,
    x: Tensor,
    sigmas,
    noise: NoiseFn | None,
    callback: Callable | None,
    levels: Levels,
    move: Move,
    s_noise: float = 1.0,
    afs: bool = False,
) -> Tensor:
    """The ancestral loop: D at the current point, `move` down to sigma_down (the denoise
    when it is 0), then s_noise * sigma_up of fresh noise."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        sigma_down, sigma_up = levels(s[i], s[i + 1])
        # Deterministic move to sigma_down
        x = denoised if sigma_down == 0 else move(model, x, s[i], sigma_down, denoised)
        # Fresh noise back up to sigma_next
        if sigma_up > 0:
            x = x + noise() * (s_noise * sigma_up)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


def euler_move(model: Denoiser, x: Tensor, sigma: float, sigma_down: float, denoised: Tensor) -> Tensor:
    """Euler's step to sigma_down with the slope d = (x - D) / sigma; no call."""
    return x + (sigma_down - sigma) * to_d(x, sigma, denoised)


def dpm_2_move(model: Denoiser, x: Tensor, sigma: float, sigma_down: float, denoised: Tensor) -> Tensor:
    """DPM-Solver-2 to sigma_down (Lu et al. 2022): midpoint in log sigma, 1 NFE."""
    return dpm_solver_step(model, x, sigma, sigma_down, to_d(x, sigma, denoised), order=2)


def dpmpp_2s_move(model: Denoiser, x: Tensor, sigma: float, sigma_down: float, denoised: Tensor) -> Tensor:
    """DPM-Solver++(2S) to sigma_down (Lu et al. 2022b, Algorithm 1, r = 1/2): a first-order
    data-prediction step to the log-midpoint, then the full step with its prediction; 1 NFE."""
    sigma_mid = math.sqrt(sigma * sigma_down)
    # First-order (DDIM) step to the midpoint
    u = lincomb([(sigma_mid / sigma, x), (1 - sigma_mid / sigma, denoised)])
    # The full step with the midpoint's data prediction
    return lincomb([(sigma_down / sigma, x), (1 - sigma_down / sigma, model(u, sigma_mid))])


def eta_levels(eta: float) -> Levels:
    """DDIM's sigma_eta on the sigma axis (`ancestral_step`)."""
    return lambda sigma, sigma_next: ancestral_step(sigma, sigma_next, eta)


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, afs=False, **_
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion's sample_dpm_2_ancestral);
    eta = 0 is DPM-Solver-2. 2 NFE per step, 1 on the step to sigma = 0."""
    return ancestral(model, x, sigmas, noise, callback, eta_levels(eta), dpm_2_move, s_noise, afs)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, afs=False, **_
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b; k-diffusion's
    sample_dpmpp_2s_ancestral). 2 NFE per step, 1 on the step to sigma = 0."""
    return ancestral(model, x, sigmas, noise, callback, eta_levels(eta), dpmpp_2s_move, s_noise, afs)


def posterior_levels(variance: str) -> Levels:
    """DDPM's q(x_next | x, x0) on the sigma axis (Ho et al. 2020, eqs. 6-7, with
    alpha_bar = 1 / (1 + sigma^2) and x = x_vp / sqrt(alpha_bar)): its mean
    (sigma_next / sigma)^2 x + (1 - (sigma_next / sigma)^2) x0 is Euler's step to
    sigma_down = sigma_next^2 / sigma. Its variance is beta_tilde ("small", the posterior's:
    sigma_up^2 = sigma_next^2 - sigma_down^2, as Euler ancestral with eta = 1) or beta
    ("large": sigma_up^2 = (sigma^2 - sigma_next^2) (1 + sigma_next^2) / (1 + sigma^2))."""

    def levels(sigma: float, sigma_next: float) -> tuple[float, float]:
        if sigma_next == 0:
            return 0.0, 0.0
        sigma_down = sigma_next**2 / sigma
        if variance == "small":
            return sigma_down, math.sqrt(sigma_next**2 - sigma_down**2)
        return sigma_down, math.sqrt((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))

    return levels


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, noise=None, callback=None, variance="small", **_) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, in x0 form): each step draws
    from the posterior q(x_next | x, x0 = D(x, sigma)) with the fixed variance beta_tilde
    (small) or beta (large); no noise on the step to sigma = 0. On a discrete-time model
    every schedule is snapped to trained timesteps, so this is DDPM's (strided) chain;
    elsewhere the VP posterior between the schedule's levels. 1 NFE per step."""
    return ancestral(model, x, sigmas, noise, callback, posterior_levels(variance), euler_move)


def plan_two_ancestral(nfe: int, options: Mapping[str, Any]) -> Plan:
    """2 NFE per step as Heun; eta must lie in [0, 1]: beyond 1 sigma_down can reach 0 before
    the schedule's end, and such a step costs one call, not two."""
    if not 0 <= float(options["eta"]) <= 1:
        raise UsageError(f"option eta={options['eta']}: use a value in [0, 1]")
    return budgets.plan_two(nfe, options)
