"""Cross-check against k-diffusion's own sampling functions (skipped when k_diffusion is not
importable; it is not a dependency of the project).

Each sampler bench-classic registers under a k-diffusion name (or whose README row names
one) runs on the analytic mixture, float32, on our default schedule's sigmas; k-diffusion's
function runs on the same model, sigmas and initial latent. Stochastic ones get the same
noise through k-diffusion's `noise_sampler` argument: a Brownian path in sigma built from a
noise stream seeded as ours, which reproduces our draws exactly (dpm++sde draws two
increments per step, the second containing the first, as k-diffusion's Brownian tree does).
`pytest -s` prints the relative errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import SampleNoise
from bench.testing import mixture

ks = pytest.importorskip("k_diffusion.sampling")

TOL = 2e-5  # float32 round-off through 10-20 steps


class BrownianPath:
    """k-diffusion's noise_sampler(sigma, sigma_next) -> (W(sigma_next) - W(sigma)) /
    sqrt(sigma - sigma_next) for a Brownian motion W in sigma, extended downwards with draws
    from `noise` as points are asked for (W = 0 at the first sigma)."""

    def __init__(self, noise) -> None:
        self.noise, self.w = noise, {}

    def at(self, sigma: float) -> float | None:
        return next((k for k in self.w if math.isclose(k, sigma, rel_tol=1e-5)), None)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        if not self.w:
            self.w[a] = 0.0
        if self.at(b) is None:
            # Extend from the nearest known point above b
            p = min(k for k in self.w if k > b)
            self.w[b] = self.w[p] + self.noise().double() * math.sqrt(p - b)
        return ((self.w[self.at(b)] - self.w[self.at(a)]) / math.sqrt(a - b)).float()


def stream(n: int = 8):
    return SampleNoise(3, range(n), mixture().shape, "cpu")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


CASES = [
    # (our spec, NFE, k-diffusion function, its keyword arguments, stochastic)
    ("euler", 10, "sample_euler", {}, False),
    ("heun", 11, "sample_heun", {}, False),
    ("dpm-solver-2", 11, "sample_dpm_2", {}, False),
    ("dpm++2m", 10, "sample_dpmpp_2m", {}, False),
    ("lms:denoise_to_zero=false", 10, "sample_lms", {}, False),
    ("euler-ancestral", 10, "sample_euler_ancestral", {}, True),
    ("dpm-2-ancestral", 11, "sample_dpm_2_ancestral", {}, True),
    ("dpm++2s-ancestral", 11, "sample_dpmpp_2s_ancestral", {}, True),
    ("dpm++sde", 11, "sample_dpmpp_sde", {}, True),
    ("dpm++sde:eta=0.5:r=0.3", 11, "sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}, True),
    ("dpm++2m-sde", 10, "sample_dpmpp_2m_sde", {}, True),
    ("dpm++2m-sde:solver_type=heun", 10, "sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    ("dpm++3m-sde", 10, "sample_dpmpp_3m_sde", {}, True),
    ("dpm++3m-sde:eta=0.5", 10, "sample_dpmpp_3m_sde", {"eta": 0.5}, True),
]


@pytest.mark.parametrize("text, nfe, function, kwargs, stochastic", CASES)
def test_sampler_equals_k_diffusions(request, solve, text, nfe, function, kwargs, stochastic):
    model, ours_noise, their_noise = mixture(), stream(), stream()
    eps, _ = ours_noise(), their_noise()  # a stream's first draw is the initial latent
    ours, sigmas, _ = solve(model, text, nfe, eps, noise=ours_noise if stochastic else None)
    extra = {"noise_sampler": BrownianPath(their_noise)} if stochastic else {}
    theirs = getattr(ks, function)(model, eps * sigmas[0], sigmas, disable=True, **kwargs, **extra)
    error = relative_error(ours, theirs)
    print(f"\n{request.node.name}: relative error {error:.1e}")
    assert error < TOL


def test_dpm_solver_3_without_the_denoise_is_dpm_fast(request, solve):
    """k-diffusion's sample_dpm_fast(sigma_min, sigma_max, n) is dpm-solver-3 on logsnr steps
    ending at sigma_min (DPM-Solver-fast's orders for n NFE), which is why it is not an alias:
    our default ends with the denoise."""
    model, eps = mixture(), stream()()
    for nfe in (9, 10, 11):
        ours, sigmas, _ = solve(model, "dpm-solver-3:denoise_to_zero=false:afs=false", nfe, eps)
        x = eps * sigmas[0]
        theirs = ks.sample_dpm_fast(model, x, model.sigma_min, model.sigma_max, nfe, disable=True)
        error = relative_error(ours, theirs)
        print(f"\n{request.node.name}[{nfe}]: relative error {error:.1e}")
        assert error < TOL


def test_schedules_equal_k_diffusions(registry):
    """karras and exponential (our logsnr) are k-diffusion's; its vp fixes beta_d = 19.9,
    beta_min = 0.1 whatever the model, where our time-uniform fits them to the model's
    sigma range: the same only for a model whose range is that VP SDE's (not an alias)."""
    lo, hi = 0.002, 80.0
    for ours, theirs in [("karras", ks.get_sigmas_karras), ("logsnr", ks.get_sigmas_exponential)]:
        mine = registry.get("schedules", ours).sigmas(12, lo, hi)
        assert torch.allclose(mine, theirs(12, lo, hi), rtol=1e-5, atol=0)
    vp = ks.get_sigmas_vp(12)
    uniform = registry.get("schedules", "time-uniform").sigmas
    assert not torch.allclose(uniform(12, lo, hi), vp, rtol=1e-2)
    assert torch.allclose(uniform(12, float(vp[-2]), float(vp[0])), vp, rtol=1e-4)


def test_dpmpp_sde_needs_the_brownian_coupling(solve):
    """Independent draws for k-diffusion's two noise calls per step (its default_noise_sampler)
    land elsewhere: our two draws per step make the Brownian increments, not fresh noise."""
    model, ours_noise, their_noise = mixture(), stream(), stream()
    eps, _ = ours_noise(), their_noise()
    ours, sigmas, _ = solve(model, "dpm++sde", 11, eps, noise=ours_noise)
    iid = ks.sample_dpmpp_sde(
        model, eps * sigmas[0], sigmas, disable=True, noise_sampler=lambda sigma, sigma_next: their_noise()
    )
    assert relative_error(ours, iid) > 100 * TOL
