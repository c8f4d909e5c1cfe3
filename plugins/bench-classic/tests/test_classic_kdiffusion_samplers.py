"""The samplers taken from k-diffusion (lms, dpm-2-ancestral, dpm++2s-ancestral, dpm++sde,
dpm++3m-sde) and DDPM: conformance of their variants, measured orders, moments, and the
identities with samplers verified elsewhere.

Every sampler at its defaults already passes test_classic_conformance (check_sampler) and
test_classic_budgets (counted NFE == budget for 3..20). Here: the deterministic limits
(eta = 0) measure their orders on the Gaussian and equal the solvers they reduce to on the
same sigmas; lms measures its order on the mixture as test_classic_orders does; the
stochastic ones' moments converge; DDPM equals diffusers' DDPMScheduler with the same noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bench_classic.sde import dpmpp_sde_update
from diffusers import DDPMScheduler
from test_classic_diffusers import DDPM, SHAPE, TOL, MixtureEps, relative_error
from test_classic_orders import BUDGETS, SPANS, order, problem  # noqa: F401 (a fixture)
from test_classic_stochastic import moments

from bench import SampleNoise
from bench.adapters import DiscreteVP
from bench.testing import check_sampler, gaussian, mixture

# Deterministic limits and their orders on the Gaussian (denoise_to_zero=false, as
# test_classic_conformance measures); dpm++3m-sde's third-order term is dpm++3m's reference
# one, second order asymptotically (README).
ODE_LIMITS = [
    ("lms", {}, 4),
    ("dpm-2-ancestral", {"eta": 0}, 2),
    ("dpm++2s-ancestral", {"eta": 0}, 2),
    ("dpm++sde", {"eta": 0}, 2),
    ("dpm++3m-sde", {"eta": 0}, 2),
]


@pytest.mark.parametrize("name, options, expected", ODE_LIMITS)
def test_deterministic_limits_converge_at_their_order(name, options, expected):
    check_sampler(name, options={**options, "denoise_to_zero": "false"}, order=expected, stochastic=False)


@pytest.mark.parametrize(
    "name, options",
    [
        ("ddpm", {"variance": "large"}),
        ("ddpm", {"denoise_to_zero": "false"}),
        ("dpm++sde", {"r": 0.3}),
        ("dpm++sde", {"afs": "true"}),
        ("dpm-2-ancestral", {"eta": 0.5, "denoise_to_zero": "false"}),
        ("dpm++3m-sde", {"eta": 0.5, "s_noise": 1.0}),
    ],
)
def test_variant_conformance(name, options):
    check_sampler(name, options=options)


@pytest.mark.parametrize(
    "text",
    ["dpm-2-ancestral", "dpm++2s-ancestral", "dpm++sde", "dpm++3m-sde", "ddpm", "ddpm:variance=large"],
)
def test_sample_moments_converge_to_the_datas(solve, text):
    """As test_classic_stochastic: the variance error at least halves from 30 to 120 NFE
    (or is within sampling noise), and the mean is right."""
    model = gaussian()
    (coarse, _), (fine, z2) = moments(solve, model, text, 31), moments(solve, model, text, 121)
    assert abs(fine - 1) < max(abs(coarse - 1) / 2, 0.03), (coarse, fine)
    assert z2 < 3


# --- Identities with verified samplers, on the same sigmas ------------------------------


def stream(seed: int = 7, n: int = 8):
    """A per-sample noise stream, fresh for each call of a test (the same draws each time)."""
    return SampleNoise(seed, range(n), mixture().shape, "cpu")


@pytest.mark.parametrize("nfe", [9, 10])
def test_dpm_2_ancestral_at_eta_0_is_dpm_solver_2(solve, nfe):
    """eta = 0 leaves no noise: the same DPM-Solver-2 steps (AFS at even budgets), bit for bit."""
    model, eps = mixture(), stream()()
    ours = solve(model, "dpm-2-ancestral:eta=0", nfe, eps)[0]
    assert torch.equal(ours, solve(model, "dpm-solver-2", nfe, eps)[0])


def test_dpmpp_sde_at_eta_0_is_dpmpp_2s(solve):
    """dpm++sde with eta = 0 and r = 1/2 is DPM-Solver++(2S), as dpm++2s-ancestral with eta = 0."""
    model, eps = mixture(), stream()()
    ours = solve(model, "dpm++sde:eta=0", 11, eps)[0]
    theirs = solve(model, "dpm++2s-ancestral:eta=0", 11, eps)[0]
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, solve(model, "dpm++sde:eta=0:r=0.3", 11, eps)[0], atol=1e-4)


def test_lms_is_deis_rhoab_on_the_same_sigmas(solve):
    model, eps = mixture(), stream()()
    ours = solve(model, "lms", 12, eps)[0]
    assert torch.equal(ours, solve(model, "deis:mode=rhoab", 12, eps, schedule="karras")[0])


def test_ddpm_small_variance_is_euler_ancestral(solve):
    """The posterior step with beta_tilde is Euler ancestral with eta = 1 (same noise, same
    sigmas); beta ("large") draws more noise."""
    model, eps = mixture(), stream()()
    ours = solve(model, "ddpm", 12, eps, schedule="karras", noise=stream())[0]
    theirs = solve(model, "euler-ancestral", 12, eps, noise=stream())[0]
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    large = solve(model, "ddpm:variance=large", 12, eps, schedule="karras", noise=stream())[0]
    assert not torch.allclose(large, theirs, atol=1e-3)


@pytest.mark.parametrize("eta", ["0", "1"])
def test_dpmpp_3m_sde_starts_as_the_2m_sde_heun(solve, eta):
    """On three steps (orders 1 and 2, then the denoise) the 3M SDE is the 2M SDE with
    solver_type=heun, whose second-order term phi_2 D1 it uses, with the same noise."""
    model, eps = mixture(), stream()()
    ours = solve(model, f"dpm++3m-sde:eta={eta}:denoise_to_zero=true", 3, eps, noise=stream())[0]
    theirs = solve(model, f"dpm++2m-sde:eta={eta}:solver_type=heun:denoise_to_zero=true", 3, eps,
                   noise=stream())[0]
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dpmpp_3m_sde_update_integrates_linear_data_predictions(k, eta):
    """The SDE update's mean is x_t = e^(-h_eta) x + int_0^h (1 + eta) e^(-(1 + eta)(h - u)) m(u) du,
    exactly for m constant (every order) and linear in lambda (orders 2, 3), whatever eta."""
    sigmas, sigma_t = [3.0, 2.0, 1.2][-k:], 0.7
    lam = [-math.log(s) for s in sigmas]
    h, a = math.log(sigmas[-1] / sigma_t), 1 + eta
    x = torch.full((1,), 0.3, dtype=torch.float64)
    for slope in [0.0] if k == 1 else [0.0, 1.0]:
        ms = [torch.tensor([2.0 + slope * (u - lam[-1])], dtype=torch.float64) for u in lam]
        decay = math.exp(-a * h)
        exact = decay * 0.3 + 2.0 * (1 - decay) + slope * (a * h - 1 + decay) / a
        assert float(dpmpp_sde_update(x, sigma_t, sigmas, ms, eta)) == pytest.approx(exact, rel=1e-12)


def test_dpmpp_3m_sde_third_order_term_at_eta_0_is_dpmpp_3ms():
    """At eta = 0 the third-order term carries half the quadratic part of m, as dpm++3m's
    reference term does (test_classic_orders): the deterministic 3M update."""
    sigmas, sigma_t = [3.0, 2.0, 1.2], 0.7
    lam = [-math.log(s) for s in sigmas]
    h = math.log(sigmas[-1] / sigma_t)
    ms = [torch.tensor([(u - lam[-1]) ** 2 / 2], dtype=torch.float64) for u in lam]
    quad = h**2 / 2 - h + 1 - math.exp(-h)  # int_0^h e^(u - h) u^2 / 2 du
    x = torch.zeros(1, dtype=torch.float64)
    assert float(dpmpp_sde_update(x, sigma_t, sigmas, ms, 0.0)) == pytest.approx(quad / 2, rel=1e-12)


def test_dpmpp_sde_brownian_increments():
    """The two increments of a dpm++sde step are standard normal with the correlation of a
    Brownian motion in sigma: sqrt((sigma - sigma_mid) / (sigma - sigma_next))."""
    from bench_classic.sde import brownian_pair

    noise = SampleNoise(0, range(20000), (1, 1, 1), "cpu")
    z_mid, z_next = (z.flatten().double() for z in brownian_pair(noise, 4.0, 1.0, 0.25))
    assert abs(float(z_next.std()) - 1) < 0.02 and abs(float(z_mid.std()) - 1) < 0.02
    rho = float(np.corrcoef(z_mid.numpy(), z_next.numpy())[0, 1])
    assert rho == pytest.approx(math.sqrt(3 / 3.75), abs=0.02)


# --- DDPM against diffusers' DDPMScheduler, with the same noise -------------------------


@pytest.mark.parametrize(
    "variance, spacing, steps",
    [
        ("small", "trailing", 50),
        ("small", "leading", 50),
        ("large", "leading", 50),
        ("small", "leading", 1000),
    ],
)
def test_ddpm_equals_diffusers_ddpm(request, registry, variance, spacing, steps):
    """Our ddpm on the `discrete` schedule of a DiscreteVP model against DDPMScheduler
    (fixed_small / fixed_large) stepping the same eps-network, float32 on both sides, the
    noise drawn from one seeded generator per side in the same order (1000 steps: DDPM's own
    chain). diffusers adds noise on a last step that ends at t = -1 when t > 0; with
    fixed_large that noise is large, so fixed_large is compared with leading spacing, whose
    last timestep is 0 (DDPM's z = 0 at t = 1)."""
    scheduler = DDPMScheduler(
        **DDPM, variance_type=f"fixed_{variance}", clip_sample=False, timestep_spacing=spacing
    )
    scheduler.set_timesteps(steps)
    net = MixtureEps(scheduler.alphas_cumprod)
    model = DiscreteVP(net, scheduler.alphas_cumprod, SHAPE, prediction="epsilon")
    eps = SampleNoise(0, range(16), SHAPE, "cpu")()
    # Ours
    sigmas = registry.get("schedules", "discrete").sigmas(
        steps, model.sigma_min, model.sigma_max, to_zero=True, denoiser=model, spacing=spacing
    )
    assert torch.allclose(sigmas[:-1].double(), net.sigmas[scheduler.timesteps].float().double())
    gen = torch.Generator().manual_seed(1)
    noise = lambda: torch.randn(eps.shape, generator=gen)  # noqa: E731
    ddpm = registry.get("samplers", "ddpm")
    ours = ddpm.sample(model, eps * sigmas[0], sigmas, noise=noise, variance=variance)
    # diffusers, on x / sqrt(1 + sigma^2)
    gen = torch.Generator().manual_seed(1)
    sample = eps * sigmas[0] / math.sqrt(1 + float(sigmas[0]) ** 2)
    for t in scheduler.timesteps:
        sample = scheduler.step(net(sample, t), t, sample, generator=gen).prev_sample
    error = relative_error(ours, sample)
    print(f"\n{request.node.name}: relative error {error:.1e}")
    assert error < TOL


# --- Orders on the analytic mixture (as test_classic_orders) ----------------------------

MIXTURE_ORDERS = [
    ("lms", 3.0),
    ("dpm-2-ancestral:eta=0", 1.8),
    ("dpm++sde:eta=0", 1.8),
    ("dpm++3m-sde:eta=0", 1.8),
]


@pytest.fixture(scope="module")
def mixture_table(problem, solve):  # noqa: F811 (the imported fixture)
    """{spec: (errors by budget, orders over SPANS)} to the reference solve, printed."""
    model, eps, ref = problem
    out = {}
    for text, _ in MIXTURE_ORDERS:
        errors = []
        for nfe in BUDGETS:
            x0 = solve(model, text, nfe, eps, denoise_to_zero="false")[0]
            errors.append(float((x0 - ref).reshape(len(x0), -1).pow(2).mean(1).sqrt().median()))
        out[text] = (errors, [order(errors, i, j) for i, j in SPANS])
    print("\nmedian RMS error to the reference (mixture, 16 samples), and measured order")
    for text, (errors, orders) in out.items():
        print(f"{text:24}", " ".join(f"{e:9.2e}" for e in errors), " ".join(f"{o:6.2f}" for o in orders))
    return out


@pytest.mark.parametrize("text, lowest", MIXTURE_ORDERS)
def test_order_on_the_mixture(mixture_table, text, lowest):
    errors, orders = mixture_table[text]
    assert errors[-1] < errors[0]
    assert orders[-1] >= lowest, f"{text}: order {orders[-1]:.2f} between NFE 20 and 80"
