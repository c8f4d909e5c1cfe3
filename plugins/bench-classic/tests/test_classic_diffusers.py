"""Independent implementation: diffusers' schedulers drive the same eps-network.

The network is the analytic mixture model's eps-prediction on DDPM timesteps (linear betas,
T = 1000). Our side wraps it in bench.adapters.DiscreteVP and samples on the `discrete`
schedule; diffusers' DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler and
UniPCMultistepScheduler step the same network at the same timesteps, from the same
initial state, in float32 on both sides. Conventions are set alike on both sides: the
final step goes to sigma = 0 (set_alpha_to_one, final_sigmas_type="zero"), and
diffusers applies lower_order_final only below 15 steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from bench import SampleNoise, Spec, resolve_options
from bench.adapters import DiscreteVP
from bench.testing import mixture

DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
SHAPE = (1, 8, 8)
TOL = 1e-4


class MixtureEps:
    """eps(x_vp, t) of the analytic mixture on DDPM timesteps: (x - D(x, sigma_t)) / sigma_t
    with x = x_vp sqrt(1 + sigma_t^2), computed in float64 and returned in float32."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.data = mixture(shape=SHAPE)
        a = alphas_cumprod.double()
        self.sigmas = ((1 - a) / a).sqrt()

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).round().long().expand(len(x_vp))
        sigma = self.sigmas[t]
        s = sigma.reshape(-1, 1, 1, 1)
        x = x_vp.double() * (1 + s**2).sqrt()
        return ((x - self.data(x, sigma)) / s).float()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def agree(request, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Our samples are diffusers' to within TOL relative error (printed with -s)."""
    error = relative_error(ours, theirs)
    print(f"\n{request.node.name}: relative error {error:.1e}")
    assert error < TOL


def drive(scheduler, net, x_T: torch.Tensor, sigmas: torch.Tensor, *, vp: bool, noises=None, eta=0.0):
    """diffusers' sampling loop. VP schedulers work on x / sqrt(1 + sigma^2): they start from
    x_T scaled so and their result is scaled back (the identity when it ends at sigma = 0)."""
    scale = lambda sigma: math.sqrt(1 + float(sigma) ** 2) if vp else 1.0  # noqa: E731
    sample = x_T / scale(sigmas[0])
    for i, t in enumerate(scheduler.timesteps):
        eps = net(scheduler.scale_model_input(sample, t), t)
        extra = {"eta": eta, "variance_noise": noises[i]} if noises is not None else {}
        sample = scheduler.step(eps, t, sample, **extra).prev_sample
    return sample * scale(sigmas[-1])


@pytest.fixture(scope="module")
def setup():
    """The eps-network, our DiscreteVP model on it, and one batch of initial noise."""
    alphas_cumprod = DDIMScheduler(**DDPM).alphas_cumprod
    net = MixtureEps(alphas_cumprod)
    model = DiscreteVP(net, alphas_cumprod, SHAPE, prediction="epsilon")
    eps = SampleNoise(0, range(16), SHAPE, "cpu")()
    return net, model, eps


def ours(registry, model, eps, text, steps, spacing="trailing", noise=None, **options):
    """Our sampler on the discrete schedule of `steps` steps ending at 0."""
    spec = Spec.parse(text)
    sampler = registry.get("samplers", spec.name)
    opts = resolve_options("sampler", spec.name, sampler.options, {**dict(spec.options), **options})
    sigmas = registry.get("schedules", "discrete").sigmas(
        steps, model.sigma_min, model.sigma_max, to_zero=True, denoiser=model, spacing=spacing
    )
    return sampler.sample(model, eps * sigmas[0], sigmas, noise=noise, **opts), sigmas


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_equals_diffusers_ddim(request, registry, setup, spacing, steps):
    net, model, eps = setup
    x0, sigmas = ours(registry, model, eps, "ddim", steps, spacing)
    scheduler = DDIMScheduler(**DDPM, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert torch.allclose(sigmas[:-1].double(), net.sigmas[scheduler.timesteps].float().double())
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=True)
    agree(request, x0, theirs)


def test_stochastic_ddim_equals_diffusers_ddim_with_the_same_noise(request, registry, setup):
    """eta > 0: the same per-step noise z enters both (diffusers' variance_noise)."""
    net, model, eps = setup
    steps, eta = 20, 0.7
    noises = [torch.randn(eps.shape, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    stream = iter(noises)
    x0, sigmas = ours(registry, model, eps, f"ddim:eta={eta}", steps, noise=lambda: next(stream))
    scheduler = DDIMScheduler(**DDPM, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=True, noises=noises, eta=eta)
    agree(request, x0, theirs)
    # The noise matters: a deterministic run lands elsewhere
    assert relative_error(ours(registry, model, eps, "ddim", steps)[0], theirs) > 100 * TOL


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_euler_equals_diffusers_euler(request, registry, setup, spacing):
    net, model, eps = setup
    x0, sigmas = ours(registry, model, eps, "euler", 12, spacing)
    scheduler = EulerDiscreteScheduler(**DDPM, timestep_spacing=spacing)
    scheduler.set_timesteps(12)
    assert torch.allclose(sigmas, scheduler.sigmas, rtol=1e-6)
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=False)
    agree(request, x0, theirs)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_multistep_equals_diffusers(request, registry, setup, order, steps):
    """diffusers lowers the final orders only below 15 steps; ours does so when asked."""
    net, model, eps = setup
    x0, sigmas = ours(registry, model, eps, f"dpm++{order}m", steps, lower_order_final=steps < 15)
    scheduler = DPMSolverMultistepScheduler(
        **DDPM,
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(steps)
    assert torch.allclose(sigmas, scheduler.sigmas, rtol=1e-6)
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=True)
    agree(request, x0, theirs)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_equals_diffusers(request, registry, setup, variant, order):
    """diffusers' bh1 with final_sigmas_type="zero" returns NaN (B(h) = -h is infinite on the
    step to 0 and multiplies a zero residual), so both sides end at sigma_min = sigma(t=0)
    instead: we sample on diffusers' own sigmas, which then end without a 0."""
    net, model, eps = setup
    scheduler = UniPCMultistepScheduler(
        **DDPM,
        solver_order=order,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="sigma_min",
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas
    assert torch.allclose(sigmas[:-1], ours(registry, model, eps, "unipc", 12)[1][:-1], rtol=1e-6)
    sampler = registry.get("samplers", "unipc")
    x0 = sampler.sample(model, eps * sigmas[0], sigmas, variant=variant, order=order, lower_order_final=True)
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=True)
    agree(request, x0, theirs)


def test_unipc_bh2_to_zero_equals_diffusers(request, registry, setup):
    """bh2 is finite on the step to 0 on both sides, so it is checked with the default convention."""
    net, model, eps = setup
    x0, sigmas = ours(registry, model, eps, "unipc:variant=bh2:order=3", 12)
    scheduler = UniPCMultistepScheduler(
        **DDPM,
        solver_order=3,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(12)
    assert torch.allclose(sigmas, scheduler.sigmas, rtol=1e-6)
    theirs = drive(scheduler, net, eps * sigmas[0], sigmas, vp=True)
    agree(request, x0, theirs)
