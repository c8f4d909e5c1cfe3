"""The adapter: diffusers' own sampling loop, with a bench Denoiser standing in for its network.

    scheduler.set_timesteps(n)
    latents = eps * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(net(x_in, t), t, latents).prev_sample

`net(x_in, t)` is what the scheduler wants, computed from one call of D(x, sigma) (bench's
x = x0 + sigma eps):

- "vp" and "k" schedulers want eps on the VP-scaled input x_in at sigma_t, the sigma of the
  timestep (DDPM's sqrt((1 - abar_t) / abar_t) for the VP ones, the scheduler's own sigma
  for the k-diffusion style ones), snapped with the model's round_sigma:
  x = x_in sqrt(1 + sigma_t^2), eps = (x - D(x, sigma_t)) / sigma_t.
- "edm" schedulers want F with D = c_skip x + c_out F (their precondition_outputs), on their
  state x itself: F = (D(x, sigma) - c_skip x) / c_out.
- "flow" wants the velocity v = eps - x0 on x_t = (1 - s) x0 + s eps:
  sigma = s / (1 - s) (s = 1 is evaluated at the model's sigma_max), v = (x_t - D) / s.

The harness's latent x = eps * sigmas[0] gives eps back; the loop starts, as diffusers'
pipelines do, from eps * init_noise_sigma and returns the loop's last sample unchanged.
All randomness comes from the `noise` stream: diffusers' variance_noise where step() takes
one, otherwise the scheduler module's randn_tensor draws from the stream during step().
"""

from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from bench.errors import PluginError

from . import timeline


def sample(entry, model, x: Tensor, sigmas: Tensor, *, noise=None, callback=None,
           num_inference_steps: int | None = None, **options: Any) -> Tensor:
    """Run the scheduler's loop on `model` from the harness's initial latent `x`."""
    if num_inference_steps is None:
        raise PluginError(f"{entry.name}: sample() needs the plan's num_inference_steps")
    scheduler = timeline.build(entry, options, model)
    timeline.set_timesteps(scheduler, num_inference_steps, device=x.device)
    step_options = {k: options[k] for k in entry.step if k in options}
    noisy = entry.draws_noise(options)
    takes_noise = "variance_noise" in inspect.signature(scheduler.step).parameters
    # The initial latent: the harness's unit noise, scaled as a diffusers pipeline scales it
    init = getattr(scheduler, "init_noise_sigma", 1.0)
    latents = x / sigmas[0].to(x.dtype) * torch.as_tensor(init, dtype=x.dtype, device=x.device)
    output = OUTPUTS[entry.kind]
    for i, t in enumerate(scheduler.timesteps):
        # The model output the scheduler wants, from one call of the Denoiser
        x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        index = getattr(scheduler, "step_index", None)
        out, denoised, sigma = output(scheduler, model, latents, x_in, t, i if index is None else index)
        # One step, its noise (if any) drawn from the stream
        extra = dict(step_options)
        if noisy and takes_noise:
            extra["variance_noise"] = draw(noise, entry)
        with drawing_from(scheduler, noise, entry), timeline.quiet(type(scheduler)):
            latents = scheduler.step(out.to(latents.dtype), t, latents, **extra).prev_sample
        if callback is not None:
            callback({"i": i, "x": latents, "sigma": sigma, "t": t, "denoised": denoised})
    return latents.to(x.dtype)


def draw(noise, entry) -> Tensor:
    if noise is None:
        raise PluginError(f"{entry.name} with these options is stochastic and needs the `noise` stream")
    return noise()


def eval_sigma(model, sigma: float) -> float:
    """The sigma the model is evaluated at: snapped to a discrete model's trained sigmas."""
    return float(model.round_sigma(torch.tensor(sigma, dtype=torch.float64)))


def eps_output(scheduler, model, latents, x_in, t, index, *, own_sigma: bool):
    """eps on the VP-scaled input x_in (the "vp" and "k" schedulers)."""
    sigma = float(scheduler.sigmas[index]) if own_sigma else timeline.train_sigma(scheduler, t)
    sigma = eval_sigma(model, sigma)
    x = x_in * math.sqrt(1 + sigma**2)
    denoised = model(x, sigma)
    return (x - denoised) / sigma, denoised, sigma


def vp_output(scheduler, model, latents, x_in, t, index):
    return eps_output(scheduler, model, latents, x_in, t, index, own_sigma=False)


def k_output(scheduler, model, latents, x_in, t, index):
    return eps_output(scheduler, model, latents, x_in, t, index, own_sigma=True)


def edm_output(scheduler, model, latents, x_in, t, index):
    """F with the scheduler's precondition_outputs(x, F, sigma) = D(x, sigma)."""
    sigma = scheduler.sigmas[index].to(latents.device)
    denoised = model(latents, float(sigma))
    skip = scheduler.precondition_outputs(latents, torch.zeros_like(latents), sigma)
    c_out = scheduler.precondition_outputs(torch.zeros(()), torch.ones(()), sigma.cpu())
    return (denoised - skip) / c_out.to(latents.device, latents.dtype), denoised, float(sigma)


def flow_output(scheduler, model, latents, x_in, t, index):
    """The velocity v = (x_t - D) / s on x_t = (1 - s) x0 + s eps."""
    s = float(scheduler.sigmas[index])
    sigma = eval_sigma(model, model.sigma_max if s >= 1 else min(s / (1 - s), model.sigma_max))
    denoised = model(latents * (1 + sigma), sigma)
    return (latents - denoised) / s, denoised, sigma


OUTPUTS = {"vp": vp_output, "k": k_output, "edm": edm_output, "flow": flow_output}


@contextmanager
def drawing_from(scheduler, noise, entry):
    """During step(), the scheduler module's randn_tensor returns the stream's next draw, so a
    scheduler that draws its own noise (Euler ancestral, SDE variants) draws ours instead;
    one that needs none never calls it."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None, **_):
        z = draw(noise, entry)
        if tuple(z.shape) != tuple(shape):
            raise PluginError(f"{entry.name}: {entry.cls} asked for noise of shape {tuple(shape)}, "
                              f"the stream gives {tuple(z.shape)}")
        return z.to(device=device or z.device, dtype=dtype or z.dtype)

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = original
