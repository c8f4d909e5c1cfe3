"""Flow matching in the sigma formulation: the `flow` schedule (uniform in t, SD3's shift,
diffusers' FlowMatchEulerDiscreteScheduler), and on Gaussian data, whose velocity field is
exact, bench.adapters.Flow equal to the exact denoiser and Euler on the sigma axis equal
to Euler in t (x_{t'} = x_t + (t' - t) v)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from bench import CellSpec, Method, Spec, build
from bench.adapters import Flow
from bench.testing import gaussian

T_MIN, T_MAX, SCALE = 0.002, 0.995, 1000.0


def shift_t(t, shift):
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(registry, n, t_lo, t_hi, to_zero=False, **options):
    sigma_min, sigma_max = t_lo / (1 - t_lo), t_hi / (1 - t_hi)
    flow = registry.get("schedules", "flow")
    return flow.sigmas(n, sigma_min, sigma_max, to_zero=to_zero, **options).double()


def velocity(data, x_t, t, prediction="velocity"):
    """The exact field of x_t = (1 - t) x0 + t eps for x0 ~ N(mu, diag(s^2)), written in t:
    x_t ~ N((1 - t) mu, (1 - t)^2 s^2 + t^2), E[x0 | x_t] = mu + (1 - t) s^2 / V (x_t - (1 - t) mu),
    E[eps | x_t] = t / V (x_t - (1 - t) mu), v = E[eps | x_t] - E[x0 | x_t]."""
    mu, s2 = data.mu[0].reshape(x_t.shape[1:]), data.var[0].reshape(x_t.shape[1:])
    t = t.reshape(-1, 1, 1, 1).double()
    var = (1 - t) ** 2 * s2 + t**2
    centred = x_t.double() - (1 - t) * mu
    x0, eps = mu + (1 - t) * s2 / var * centred, t / var * centred
    return {"velocity": eps - x0, "sample": x0, "epsilon": eps}[prediction]


@pytest.fixture(scope="module")
def data():
    return gaussian()


def flow_model(data, prediction="velocity"):
    net_fn = lambda x_t, tau: velocity(data, x_t, tau / SCALE, prediction)  # noqa: E731
    return Flow(net_fn, data.shape, prediction=prediction, time_scale=SCALE, t_min=T_MIN, t_max=T_MAX)


def test_flow_schedule_is_uniform_in_t_with_the_sd3_shift(registry):
    for n, to_zero, shift in ((5, False, 1.0), (8, True, 1.0), (6, False, 3.0)):
        sigmas = flow_sigmas(registry, n, T_MIN, T_MAX, to_zero=to_zero, shift=shift)
        t = (sigmas / (1 + sigmas)).numpy()
        # Uniform before the shift, between the unshifted ends; the shifted ends are the model's
        u_hi, u_lo = shift_t(T_MAX, 1 / shift), shift_t(T_MIN, 1 / shift)
        expected = shift_t(np.linspace(u_hi, u_lo, n if to_zero else n + 1), shift)
        assert len(sigmas) == n + 1 and (t[-1] == 0) == to_zero
        np.testing.assert_allclose(t[: len(expected)], expected, rtol=1e-6, atol=0)
        assert t[0] == pytest.approx(T_MAX, rel=1e-7)
        assert t[len(expected) - 1] == pytest.approx(T_MIN, rel=1e-6)
    # A shift > 1 spends more of the steps at high noise (SD3, section 5.3.2)
    plain, shifted = (flow_sigmas(registry, 6, T_MIN, T_MAX, shift=s) for s in (1.0, 3.0))
    assert bool((shifted[1:-1] > plain[1:-1]).all())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_is_diffusers_flow_match_euler(registry, shift):
    """diffusers spaces n times linearly from t = 1 to its shifted t_min, shifts them (again)
    and appends 0; with the same ends (t = 1 as sigma = 1e7) the steps are the same."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(7)
    theirs = scheduler.sigmas.double().numpy()
    t_lo = shift_t(scheduler.sigma_min, shift)  # diffusers' last t: its sigma_min, shifted once more
    sigmas = flow_sigmas(registry, 7, t_lo, 1e7 / (1 + 1e7), to_zero=True, shift=shift)
    np.testing.assert_allclose((sigmas / (1 + sigmas)).numpy(), theirs, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("prediction", ["velocity", "sample", "epsilon"])
def test_exact_velocity_through_flow_is_the_exact_denoiser(data, prediction):
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.002, 0.05, 0.4, 1.0, 3.0, 30.0, 199.0], dtype=torch.float64)
    x = data.mu[0].reshape(1, 1, 8, 8) + sigma.reshape(-1, 1, 1, 1) * torch.randn(
        7, 1, 8, 8, generator=gen, dtype=torch.float64)
    flow = flow_model(data, prediction)
    torch.testing.assert_close(flow(x, sigma), data(x, sigma), rtol=0, atol=1e-10)


def test_euler_on_the_sigma_axis_is_euler_in_t(registry, solve, data):
    """bench-classic's Euler, dx/dsigma = (x - D) / sigma on the `flow` schedule, is Euler in t
    on the exact field: x_sigma = x_t / (1 - t) at every step, to round-off."""
    model, n = flow_model(data), 6
    eps = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0, sigmas, nfe = solve(model, "euler", n, eps, schedule="flow")
    # Euler in t on the same steps (uniform in t), from x_{t_max} = t_max eps (x = sigma_max eps)
    t = np.linspace(T_MAX, T_MIN, n + 1)
    x_t = torch.as_tensor(t[0]) * eps
    for t_cur, t_next in zip(t[:-1], t[1:], strict=True):
        x_t = x_t + (t_next - t_cur) * velocity(data, x_t, torch.full((16,), t_cur, dtype=torch.float64))
    by_hand = x_t / (1 - t[-1])
    assert nfe == n
    torch.testing.assert_close(x0, by_hand, rtol=0, atol=2e-5)
    # Not trivially equal: both are far from the exact ODE solution at 6 steps
    exact = data.ode_solution(eps * float(sigmas[0]), float(sigmas[0]), float(sigmas[-1]))
    assert float((by_hand - exact).abs().max()) > 100 * 2e-5


def test_a_flow_model_gets_its_own_schedule_where_the_method_names_none(registry, data):
    model = flow_model(data)
    own = build(registry, CellSpec("flow", Method(Spec.parse("dpm++2m")), nfe=5), model)
    assert own.schedule == "flow"
    torch.testing.assert_close(own.sigmas.double(), flow_sigmas(registry, 5, T_MIN, T_MAX).float().double())
    karras = Method(Spec.parse("dpm++2m"), Spec.parse("karras"))
    named = build(registry, CellSpec("flow", karras, nfe=5), model)
    assert named.schedule == "karras"
    # A diffusion model keeps the sampler's default
    diffusion = build(registry, CellSpec("gaussian", Method(Spec.parse("dpm++2m")), nfe=5), data)
    assert diffusion.schedule == "logsnr"
