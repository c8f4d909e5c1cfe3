"""Each sampler equals diffusers' own sampling loop on the same network from the same noise.

The network is a tiny random-init diffusers UNet2DModel. As an eps-network on DDPM's
timesteps it is wrapped in bench.adapters.DiscreteVP (the plugin then builds each scheduler
on the model's own betas); as an EDM network in bench.adapters.Preconditioned("edm"); as a
flow-matching velocity network in a small Denoiser declared `flow = True`. The reference is
the plain diffusers loop:

    scheduler.set_timesteps(n); x = eps * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample

with stochastic schedulers drawing from a torch.Generator, whose draws the plugin's side
receives through its noise stream in the same order. Run with -s to see the errors.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import UNet2DModel

from bench import CountingDenoiser, Denoiser, SampleNoise, resolve_options
from bench.adapters import DiscreteVP, Preconditioned

SHAPE = (2, 8, 8)
DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
TOL = 2e-6  # relative error, float32 round-off through the whole loop
STEPS = 10  # integer timesteps under every spacing, so a discrete network sees diffusers' t

# (sampler, options, network kind); the reference builds the same class with the same config
CASES = [
    ("diffusers-dpmsolver-multistep", {}, "eps"),
    ("diffusers-dpmsolver-multistep", {"solver_order": 3, "use_karras_sigmas": True}, "eps"),
    ("diffusers-dpmsolver-multistep-sde", {}, "eps"),
    ("diffusers-dpmsolver-multistep-sde", {"solver_order": 3}, "eps"),
    ("diffusers-dpmsolver-singlestep", {}, "eps"),
    ("diffusers-dpmsolver-singlestep", {"solver_order": 3}, "eps"),
    ("diffusers-unipc", {}, "eps"),
    ("diffusers-unipc", {"solver_order": 3, "timestep_spacing": "trailing"}, "eps"),
    ("diffusers-deis", {}, "eps"),
    ("diffusers-euler", {}, "eps"),
    ("diffusers-euler", {"timestep_spacing": "leading", "steps_offset": 1}, "eps"),
    ("diffusers-euler-ancestral", {}, "eps"),
    ("diffusers-heun", {}, "eps"),
    ("diffusers-ddim", {}, "eps"),
    ("diffusers-ddim", {"eta": 1.0, "timestep_spacing": "trailing"}, "eps"),
    ("diffusers-pndm", {}, "eps"),
    ("diffusers-pndm", {"skip_prk_steps": True, "steps_offset": 1}, "eps"),
    ("diffusers-lms", {}, "eps"),
    ("diffusers-edm-euler", {}, "edm"),
    ("diffusers-edm-dpmsolver-multistep", {}, "edm"),
    ("diffusers-edm-dpmsolver-multistep", {"algorithm_type": "sde-dpmsolver++"}, "edm"),
    ("diffusers-flow-match-euler", {}, "flow"),
    ("diffusers-flow-match-euler", {"shift": 3.0}, "flow"),
]
STEP_KEYS = ("eta", "order")


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


class FlowNet(Denoiser):
    """A velocity network v(x_t, 1000 s) on x_t = (1 - s) x0 + s eps, as a bench Denoiser:
    s = sigma / (1 + sigma), x_t = x / (1 + sigma), D = x_t - s v. s = 1 sits at sigma_max."""

    flow = True

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.net, self.shape = unet, SHAPE
        self.sigma_min, self.sigma_max = 1e-4, 1e9

    def forward(self, x, sigma):
        s = (sigma.double() / (1 + sigma.double())).reshape(-1, 1, 1, 1)
        x_t = x / (1 + sigma.reshape(-1, 1, 1, 1))
        v = self.net(x_t, (1000 * s.reshape(-1)).float()).sample
        return x_t - s.float() * v


@pytest.fixture(scope="module")
def nets():
    unet = tiny_unet()
    betas = torch.linspace(DDPM["beta_start"], DDPM["beta_end"], 1000, dtype=torch.float32)
    abar = torch.cumprod(1 - betas.double(), dim=0)
    eps_model = DiscreteVP(lambda x, t: unet(x, t).sample, abar, SHAPE, prediction="epsilon", net=unet)
    edm_model = Preconditioned(lambda x, c: unet(x, c.float()).sample, "edm", SHAPE)
    return {"eps": (eps_model, lambda x, t: unet(x, t).sample),
            "edm": (edm_model, lambda x, t: unet(x, t.reshape(-1).float()).sample),
            "flow": (FlowNet(unet), lambda x, t: unet(x, t.reshape(-1).float()).sample)}


def reference(sampler, options, net, eps, seed):
    """diffusers' loop, the scheduler built from the class with the same config."""
    import diffusers
    from bench_diffusers.catalog import ENTRIES

    entry = next(e for e in ENTRIES if e.name == sampler.name)
    cls = getattr(diffusers, entry.cls)
    config = {k: v for k, v in options.items() if k in entry.config}
    axis = DDPM if entry.kind in ("vp", "k") else {}
    scheduler = cls(**axis, **config)
    scheduler.set_timesteps(STEPS)
    step = {k: options[k] for k in STEP_KEYS if k in entry.step}
    if "generator" in inspect.signature(scheduler.step).parameters:
        step["generator"] = torch.Generator().manual_seed(seed)
    x = eps * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(net(x_in, t), t, x, **step).prev_sample
    return x, len(scheduler.timesteps)


def ours(sampler, options, model, eps, seed):
    """The plugin through the real NFE counter: plan the loop's calls, sample from eps * sigmas[0]."""
    for budget in range(1, 40):
        try:
            plan = sampler.plan(budget, options)
        except Exception:
            continue
        if plan.options["num_inference_steps"] == STEPS:
            break
    sigmas = plan.sigmas(model, "cpu").float()
    counted = CountingDenoiser(model, budget=plan.nfe)
    generator = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(eps.shape, generator=generator)  # noqa: E731
    x0 = sampler.sample(counted, eps * sigmas[0], sigmas, noise=noise, **{**options, **plan.options})
    return x0, counted.nfe, plan.nfe


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


IDS = ["-".join([n, *map(str, o.values())]) for n, o, _ in CASES]


@pytest.mark.parametrize("name, given, kind", CASES, ids=IDS)
def test_equals_the_diffusers_loop(registry, nets, name, given, kind):
    sampler = registry.get("samplers", name)
    options = resolve_options("sampler", name, sampler.options, {k: str(v) for k, v in given.items()})
    model, net = nets[kind]
    eps = SampleNoise(0, range(3), SHAPE, "cpu")()
    with torch.inference_mode():
        theirs, calls = reference(sampler, options, net, eps, seed=1)
        mine, counted, planned = ours(sampler, options, model, eps, seed=1)
    error = relative_error(mine, theirs)
    print(f"\n{name} {given}: {calls} calls, relative error {error:.1e}")
    assert counted == planned == calls
    assert torch.isfinite(theirs).all()
    assert error < TOL
