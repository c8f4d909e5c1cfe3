"""Stochastic samplers and options: the same seed gives the same samples, another seed
other samples, and the samples' moments converge to the data's."""

from __future__ import annotations

import pytest
import torch

from bench import SampleNoise
from bench.testing import gaussian

# Samplers that draw noise by default, and deterministic ones made stochastic by an option
STOCHASTIC = [
    "euler-ancestral",
    "dpm++2m-sde",
    "dpm++2m-sde:solver_type=heun",
    "ddim:eta=1",
    "euler:churn=40",
    "heun:churn=40:s_tmin=0.05:s_tmax=50",
]


def draw(solve, model, text, nfe, seed, n=8):
    noise = SampleNoise(seed, range(n), model.shape, "cpu")
    return solve(model, text, nfe, noise(), noise=noise)[0]


@pytest.mark.parametrize("text", STOCHASTIC)
def test_same_seed_same_samples_other_seed_other_samples(solve, text):
    model = gaussian()
    first, again = draw(solve, model, text, 9, seed=0), draw(solve, model, text, 9, seed=0)
    assert torch.equal(first, again)
    assert not torch.allclose(first, draw(solve, model, text, 9, seed=1))


def moments(solve, model, text, nfe, n=512) -> tuple[float, float]:
    """(mean variance ratio to the data's, mean square z-score of the per-pixel means)."""
    x = draw(solve, model, text, nfe, seed=0, n=n).double().reshape(n, -1)
    mu, var = model.mu[0], model.var[0]
    z_mean = (x.mean(0) - mu) / (var / n).sqrt()
    return float((x.var(0) / var).mean()), float(z_mean.pow(2).mean())


@pytest.mark.parametrize(
    "text", ["euler-ancestral", "ddim:eta=1", "dpm++2m-sde", "heun:churn=40:s_tmin=0.05:s_tmax=50"]
)
def test_sample_moments_converge_to_the_datas(solve, text):
    """The samples' variance approaches the data's at first order or better (its error at
    least halves from 30 to 120 NFE, or is within sampling noise), their mean is right."""
    model = gaussian()
    (coarse, _), (fine, z2) = moments(solve, model, text, 30), moments(solve, model, text, 120)
    assert abs(fine - 1) < max(abs(coarse - 1) / 2, 0.03), (coarse, fine)
    assert z2 < 3


def test_churn_changes_only_the_steps_inside_its_sigma_range(solve):
    """EDM's S_tmin/S_tmax: a range that holds none of the schedule's sigmas leaves Heun
    deterministic, identical to the churn-free sampler."""
    model = gaussian()
    plain = draw(solve, model, "heun", 9, seed=0)
    assert torch.equal(plain, draw(solve, model, "heun:churn=40:s_tmin=1000:s_tmax=2000", 9, seed=0))
    assert not torch.allclose(plain, draw(solve, model, "heun:churn=40", 9, seed=0))
