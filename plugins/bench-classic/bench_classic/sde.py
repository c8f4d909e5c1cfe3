"""DPM-Solver++ for the diffusion SDE: the singlestep SDE solver and the 3M SDE.

In the sigma formulation (alpha = 1, lambda = -log sigma, h = log(sigma / sigma_next)) the
data-prediction SDE with noise scale eta solves exactly as
x_next = (sigma_next / sigma) e^(-eta h) x + int (1 + eta) e^(-(1 + eta)(lambda_next - l)) D dl
+ sigma_next sqrt(1 - e^(-2 eta h)) z, so the ODE solvers' formulas hold with h replaced by
h_eta = (1 + eta) h (Lu et al. 2022b; k-diffusion's sample_dpmpp_sde and
sample_dpmpp_3m_sde). eta = 0 is the ODE. Every draw comes from the `noise` stream; a step
to sigma = 0 is the denoise x = D(x, sigma).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench import Plan
from bench.errors import UsageError

from . import budgets
from .multistep import lincomb, step_order
from .samplers import ancestral_step, denoise, floats, report


def brownian_pair(noise, sigma: float, sigma_mid: float, sigma_next: float) -> tuple[Tensor, Tensor]:
    """Normalised Brownian increments, in sigma as time, over [sigma_mid, sigma] and over the
    whole [sigma_next, sigma], from two fresh draws: the second contains the first, as
    k-diffusion's Brownian tree makes them (its increments over disjoint steps are
    independent, which fresh draws are too)."""
    z_1, z_2 = noise(), noise()
    a, b = math.sqrt(sigma - sigma_mid), math.sqrt(sigma_mid - sigma_next)
    return z_1, lincomb([(a / math.hypot(a, b), z_1), (b / math.hypot(a, b), z_2)])


@torch.no_grad()
def sample_dpmpp_sde(
    model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, r=0.5, afs=False, **_
) -> Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde: per step an ancestral
    first-order step to the intermediate level sigma^(1-r) sigma_next^r, then an ancestral
    first-order step to sigma_next with the data prediction (1 - 1/2r) D + 1/2r D_mid.
    eta = 0 (r = 1/2) is DPM-Solver++(2S). 2 NFE per step, 1 on the step to sigma = 0."""
    s = floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs is True and i == 0)
        if s[i + 1] == 0:
            # Denoise to 0
            x = denoised
            report(callback, i, x, s[i], s[i + 1], denoised)
            continue
        sigma_mid = s[i] ** (1 - r) * s[i + 1] ** r
        z_mid, z_next = brownian_pair(noise, s[i], sigma_mid, s[i + 1]) if eta > 0 else (None, None)
        # Step 1: ancestral first-order step to sigma_mid
        down, up = ancestral_step(s[i], sigma_mid, eta)
        terms = [(down / s[i], x), (1 - down / s[i], denoised)]
        x_mid = lincomb(terms + ([(up * s_noise, z_mid)] if up > 0 else []))
        # Step 2: ancestral first-order step to sigma_next with the combined prediction
        fac = 1 / (2 * r)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        d_mix = [(1 - fac, denoised), (fac, model(x_mid, sigma_mid))]
        terms = [(down / s[i], x), *[((1 - down / s[i]) * c, d) for c, d in d_mix]]
        x = lincomb(terms + ([(up * s_noise, z_next)] if up > 0 else []))
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x


def plan_sde(nfe: int, options: Mapping[str, Any]) -> Plan:
    """2 NFE per step as Heun; the intermediate point's fraction r must lie in (0, 1)."""
    if not 0 < float(options["r"]) < 1:
        raise UsageError(f"option r={options['r']}: use a value in (0, 1)")
    return budgets.plan_two(nfe, options)


def dpmpp_sde_update(
    x: Tensor, sigma_t: float, sigmas: list[float], ms: list[Tensor], eta: float, z: Tensor | None = None
) -> Tensor:
    """Multistep DPM-Solver++ SDE of order len(ms) (1-3) from the last points `sigmas`, `ms`
    (newest last), in k-diffusion's 3M SDE form: first-order term with h_eta = (1 + eta) h,
    then phi_2 D1 (order 2), or phi_2 D1 - phi_3 D2 (order 3, the deterministic 3M's
    reference term), and the noise z scaled to the step's variance."""
    sigma_s0 = sigmas[-1]
    m = np.eye(len(ms))  # m[0] = m0 (newest), m[1] = m_(-1), m[2] = m_(-2), as coefficients
    h = math.log(sigma_s0 / sigma_t)
    h_eta = (1 + eta) * h
    coeff = -math.expm1(-h_eta) * m[0]
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if len(ms) >= 2:
        # Divided differences in units of h (ratios of the unscaled steps)
        r0 = math.log(sigmas[-2] / sigma_s0) / h
        D1_0 = (m[0] - m[1]) / r0
        coeff = coeff + phi_2 * D1_0
    if len(ms) == 3:
        # Third order: the second divided difference
        r1 = math.log(sigmas[-3] / sigmas[-2]) / h
        D1_1 = (m[1] - m[2]) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        coeff = -math.expm1(-h_eta) * m[0] + phi_2 * D1 - (phi_2 / h_eta - 0.5) * D2
    terms = [(math.exp(-h_eta), x), *zip(coeff, reversed(ms), strict=True)]
    if z is not None:
        terms.append((sigma_t * math.sqrt(-math.expm1(-2 * eta * h)), z))
    return lincomb(terms)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0, **_) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): multistep, orders 1, 2, then
    3, fresh noise each step; 1 NFE per step. eta = 0 is the ODE solver, whose third-order
    steps are dpm++3m's (its second step is the 2M SDE's 'heun' one)."""
    s = floats(sigmas)
    ms: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = model(x, s[i])
        ms = (ms + [denoised])[-3:]
        if s[i + 1] == 0:
            # Denoise to 0
            x = denoised
        else:
            # Multistep SDE update of the available order, with fresh noise
            k = step_order(3, i, len(s) - 1, False)
            z = noise() * s_noise if eta > 0 else None
            x = dpmpp_sde_update(x, s[i + 1], s[: i + 1][-k:], ms[-k:], eta, z)
        report(callback, i, x, s[i], s[i + 1], denoised)
    return x
