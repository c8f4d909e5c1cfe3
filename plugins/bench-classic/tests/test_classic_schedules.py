"""Schedules: the formulas, diffusers' discrete spacings, snapping, and the discrete
schedule's refusal of continuous-time models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bench_classic.schedules import discrete_timesteps
from diffusers import DDIMScheduler

from bench.adapters import DiscreteVP
from bench.cli import main
from bench.errors import UsageError
from bench.testing import gaussian

DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def ddpm():
    """A discrete-time model on linear betas, T = 1000 (the network is not called here)."""
    alphas_cumprod = DDIMScheduler(**DDPM).alphas_cumprod
    return DiscreteVP(lambda x, t: torch.zeros_like(x), alphas_cumprod, (1, 8, 8))


def sigmas_of(registry, name, n, model, to_zero=True, **options):
    return (
        registry.get("schedules", name)
        .sigmas(n, model.sigma_min, model.sigma_max, to_zero=to_zero, denoiser=model, **options)
        .double()
    )


def test_karras_is_edm_eq_5_and_polynomial_the_same(registry):
    model = gaussian()
    i = np.arange(18)
    lo, hi = model.sigma_min ** (1 / 7), model.sigma_max ** (1 / 7)
    edm = (hi + i / 17 * (lo - hi)) ** 7
    sigmas = sigmas_of(registry, "karras", 18, model)
    assert np.allclose(sigmas[:-1].numpy(), edm, rtol=1e-6) and sigmas[-1] == 0
    assert torch.equal(sigmas, sigmas_of(registry, "polynomial", 18, model))


def test_logsnr_steps_are_uniform_in_log_sigma(registry):
    model = gaussian()
    sigmas = sigmas_of(registry, "logsnr", 10, model, to_zero=False)
    steps = sigmas.log().diff()
    expected = math.log(model.sigma_min / model.sigma_max) / 10
    assert torch.allclose(steps, torch.full_like(steps, expected), rtol=1e-5)


def test_time_uniform_exponent_spaces_vp_time(registry):
    """rho = 2 (DEIS's default): t^(1/2) uniform; sigma(t) of the fitted VP SDE."""
    from bench_classic.schedules import vp_fit, vp_time

    model = gaussian()
    sigmas = sigmas_of(registry, "time-uniform", 6, model, to_zero=False, rho=2.0)
    t = vp_time(sigmas, *vp_fit(model.sigma_min, model.sigma_max))
    assert torch.allclose(t.sqrt().diff(), t.sqrt().diff()[:1].expand(6), rtol=1e-4)
    assert math.isclose(float(t[0]), 1.0, rel_tol=1e-5) and math.isclose(float(t[-1]), 1e-3, rel_tol=1e-3)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_discrete_timesteps_are_diffusers_ddim_timesteps(spacing):
    scheduler = DDIMScheduler(**DDPM, timestep_spacing=spacing)
    for n in range(1, 60):
        scheduler.set_timesteps(n)
        assert discrete_timesteps(1000, n, spacing) == scheduler.timesteps.tolist(), (spacing, n)


def test_discrete_trailing_keeps_n_steps_where_numpy_adds_a_spurious_one():
    """diffusers' trailing spacing yields 62 timesteps, the last -1, when asked for 61."""
    steps = discrete_timesteps(1000, 61, "trailing")
    assert len(steps) == 61 and min(steps) >= 0


def test_discrete_sigmas_are_the_models_trained_sigmas(registry, ddpm):
    sigmas = sigmas_of(registry, "discrete", 10, ddpm)
    timesteps = torch.tensor(discrete_timesteps(1000, 10, "trailing"))
    assert torch.allclose(sigmas[:-1], ddpm.discrete_sigmas[timesteps].float().double())
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(ddpm.sigma_max, rel=1e-6)
    leading = sigmas_of(registry, "discrete", 10, ddpm, to_zero=False, spacing="leading")
    assert len(leading) == 11 and float(leading[-1]) == pytest.approx(ddpm.sigma_min, rel=1e-6)


def test_schedules_snap_to_a_discrete_models_sigmas(registry, ddpm):
    """EDM's round_sigma: a karras schedule on a DDPM lands on trained noise levels."""
    sigmas = sigmas_of(registry, "karras", 12, ddpm)[:-1]
    table = ddpm.discrete_sigmas.float().double()
    assert all(bool((table == s).any()) for s in sigmas)


def test_discrete_on_a_continuous_model_is_a_usage_error(registry, capsys, tmp_path):
    with pytest.raises(UsageError, match="needs a discrete-time model"):
        sigmas_of(registry, "discrete", 10, gaussian())
    args = "run --samplers ddim --schedule discrete --model gaussian --nfe 5 --num-samples 2 --quiet"
    code = main([*args.split(), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == UsageError.exit_code
    assert err.startswith("error: schedule 'discrete' needs a discrete-time model") and "\n" not in err
