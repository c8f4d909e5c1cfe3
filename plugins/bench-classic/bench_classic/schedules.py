"""Noise schedules: n steps -> n + 1 decreasing sigmas from sigma_max.

With `to_zero` the last of n sigmas is sigma_min and a 0 is appended (EDM); without it
the n + 1 sigmas end at sigma_min (diff-sampler's convention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _finish(sigmas: Tensor, to_zero: bool) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas


def _ramp(n: int, to_zero: bool, device) -> Tensor:
    """0..1 over the sigmas before the optional final 0."""
    m = n if to_zero else n + 1
    return torch.linspace(0, 1, m, dtype=torch.float64, device=device) if m > 1 else torch.zeros(
        1, dtype=torch.float64, device=device
    )


def karras(n, sigma_min, sigma_max, *, to_zero=True, device="cpu", rho=7.0, **_) -> Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho) from sigma_max to sigma_min."""
    ramp = _ramp(n, to_zero, device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, to_zero).float()


def time_uniform(n, sigma_min, sigma_max, *, to_zero=True, device="cpu", rho=1.0, eps_s=1e-3, **_):
    """VP time-uniform (Song et al. 2021; diff-sampler's variant): t^(1/rho) uniform in [eps_s, 1].

    The VP SDE's beta_d, beta_min are fitted so that sigma(1) = sigma_max and
    sigma(eps_s) = sigma_min, with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
    """
    a, b = math.log(sigma_min**2 + 1), math.log(sigma_max**2 + 1)
    beta_d = 2 * (a / eps_s - b) / (eps_s - 1)
    beta_min = b - beta_d / 2
    ramp = _ramp(n, to_zero, device)
    t = (1 + ramp * (eps_s ** (1 / rho) - 1)) ** rho
    sigmas = torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    return _finish(sigmas, to_zero).float()
