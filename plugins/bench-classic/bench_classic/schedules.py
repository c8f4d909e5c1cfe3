"""Noise schedules: n steps -> n + 1 decreasing sigmas from sigma_max.

With `to_zero` the last of n sigmas is sigma_min and a 0 is appended (EDM); without it
the n + 1 sigmas end at sigma_min (diff-sampler's convention). Every schedule is snapped
to the model's trained noise levels with `denoiser.round_sigma`, as EDM's generate.py
does (the identity for continuous-time models).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bench.errors import Infeasible, UsageError

SPACINGS = ("trailing", "leading", "linspace")


def _ramp(n: int, to_zero: bool, device) -> Tensor:
    """0..1 over the sigmas before the optional final 0."""
    m = n if to_zero else n + 1
    if m == 1:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.linspace(0, 1, m, dtype=torch.float64, device=device)


def _finish(sigmas: Tensor, to_zero: bool, denoiser=None) -> Tensor:
    """Snap to the model's noise levels, check they still decrease, append the final 0."""
    if denoiser is not None:
        sigmas = torch.as_tensor(denoiser.round_sigma(sigmas), dtype=torch.float64, device=sigmas.device)
    if len(sigmas) > 1 and not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise Infeasible(f"{len(sigmas)} sigmas snap to repeated noise levels of this model; use fewer steps")
    if to_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.float()


def karras(n, sigma_min, sigma_max, *, to_zero=True, denoiser=None, device="cpu", rho=7.0, **_) -> Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho) from sigma_max to sigma_min."""
    if not (math.isfinite(rho) and rho > 0):
        raise UsageError(f"schedule 'karras': rho={rho} must be a positive number, e.g. 7.0 (EDM)")
    ramp = _ramp(n, to_zero, device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, to_zero, denoiser)


def logsnr(n, sigma_min, sigma_max, *, to_zero=True, denoiser=None, device="cpu", **_) -> Tensor:
    """Uniform in log-SNR, i.e. in log sigma (Lu et al. 2022, DPM-Solver's 'logSNR' steps)."""
    ramp = _ramp(n, to_zero, device)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _finish(torch.exp(hi + ramp * (lo - hi)), to_zero, denoiser)


def flow_shift(t, shift: float):
    """SD3's time shift (Esser et al. 2024, eq. 23): t' = shift t / (1 + (shift - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def flow(n, sigma_min, sigma_max, *, to_zero=True, denoiser=None, device="cpu", shift=1.0, **_) -> Tensor:
    """Flow matching's steps: uniform in t = sigma / (1 + sigma) from t_max to t_min, as
    diffusers' FlowMatchEulerDiscreteScheduler spaces them (its linspace), then SD3's `shift`;
    sigma = t / (1 - t). The ramp is uniform before the shift, whose ends are the model's."""
    if not (math.isfinite(shift) and shift > 0):
        raise UsageError(f"schedule 'flow': shift={shift} must be a positive number, e.g. 3.0 (SD3)")
    ramp = _ramp(n, to_zero, device)
    # The model's t range, unshifted, so that the shifted ends are t_min and t_max again
    t_lo, t_hi = sigma_min / (1 + sigma_min), sigma_max / (1 + sigma_max)
    u_lo, u_hi = (flow_shift(t, 1 / shift) for t in (t_lo, t_hi))
    t = flow_shift(u_hi + ramp * (u_lo - u_hi), shift)
    return _finish(t / (1 - t), to_zero, denoiser)


def vp_fit(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP SDE with sigma(eps_s) = sigma_min and sigma(1) = sigma_max,
    where sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (diff-sampler's fit)."""
    a, b = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (a / eps_s - b) / (eps_s - 1)
    return beta_d, b - beta_d / 2


def vp_time(sigma, beta_d: float, beta_min: float):
    """The VP time t of a noise level sigma (a tensor, array or float): `vp_fit`'s sigma(t) inverted."""
    lib = torch if isinstance(sigma, Tensor) else np
    return (lib.sqrt(beta_min**2 + 2 * beta_d * lib.log1p(sigma**2)) - beta_min) / beta_d


def time_uniform(
    n, sigma_min, sigma_max, *, to_zero=True, denoiser=None, device="cpu", rho=1.0, eps_s=1e-3, **_
) -> Tensor:
    """VP time-uniform (Song et al. 2021; diff-sampler's variant): t^(1/rho) uniform in [eps_s, 1]."""
    if not (math.isfinite(rho) and rho > 0 and 0 < eps_s < 1):
        raise UsageError(f"schedule 'time-uniform': rho={rho}, eps_s={eps_s}; rho must be positive and "
                         "eps_s in (0, 1), e.g. rho=1.0:eps_s=0.001")
    beta_d, beta_min = vp_fit(sigma_min, sigma_max, eps_s)
    ramp = _ramp(n, to_zero, device)
    t = (1 + ramp * (eps_s ** (1 / rho) - 1)) ** rho
    return _finish(torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)), to_zero, denoiser)


def discrete_timesteps(num_train: int, m: int, spacing: str, offset: int = 0) -> list[int]:
    """m integer timesteps, decreasing, spaced exactly as diffusers' DDIM scheduler spaces them
    (Lin et al. 2024, Table 2): trailing starts at T - 1, leading ends at `offset`, linspace
    spans both ends. numpy's arithmetic is kept so that ties round the same way; trailing
    keeps m values where numpy's arange yields a spurious (m+1)-th, -1."""
    if spacing == "trailing":
        steps = np.round(np.arange(num_train, 0, -num_train / m))[:m] - 1
    elif spacing == "leading":
        steps = (np.arange(0, m) * (num_train // m)).round()[::-1] + offset
    elif spacing == "linspace":
        steps = np.linspace(0, num_train - 1, m).round()[::-1]
    else:
        raise UsageError(f"schedule 'discrete' has no spacing '{spacing}'; use one of {', '.join(SPACINGS)}")
    return [int(t) for t in steps]


def discrete(
    n, sigma_min, sigma_max, *, to_zero=True, denoiser=None, device="cpu", spacing="trailing", offset=0, **_
) -> Tensor:
    """The trained timesteps of a discrete-time (DDPM-type) model, spaced as in diffusers.

    Needs `denoiser.discrete_sigmas` (increasing, one per training timestep, as
    `bench.adapters.DiscreteVP` exposes); sigma_min and sigma_max are the model's own.
    """
    table = getattr(denoiser, "discrete_sigmas", None)
    if table is None:
        raise UsageError(
            "schedule 'discrete' needs a discrete-time model (one with discrete_sigmas, "
            "e.g. a DDPM network in bench.adapters.DiscreteVP); use karras, logsnr or time-uniform"
        )
    m = n if to_zero else n + 1
    if m > len(table):
        raise Infeasible(f"{m} sigmas asked of a model trained on {len(table)} timesteps")
    timesteps = torch.tensor(discrete_timesteps(len(table), m, spacing, offset), device=table.device)
    return _finish(table.double()[timesteps].to(device), to_zero, denoiser)
