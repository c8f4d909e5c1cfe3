"""A diffusers scheduler built for a bench Denoiser, and the sigmas of the time steps it visits.

The time axis: a discrete model that carries its own alphas_cumprod (bench's DiscreteVP keeps
them as `discrete_sigmas`, sigma_t = sqrt((1 - abar_t) / abar_t)) gets a scheduler on its own
betas, beta_t = 1 - abar_t / abar_{t-1}; any other model gets diffusers' default DDPM axis
(linear betas 1e-4..0.02, T = 1000) and is evaluated at the sigma of each timestep. The EDM
schedulers work in sigma and the flow-matching one in s = sigma / (1 + sigma), so they take
no betas.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch
from torch import Tensor

from bench.errors import Infeasible, NotApplicable, UsageError

DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@contextmanager
def quiet(scheduler_cls: type):
    """Silence the scheduler module's warnings (e.g. DPMSolverSinglestep announcing that it
    switches lower_order_final on), which would otherwise repeat on every batch of a run."""
    logger = logging.getLogger(scheduler_cls.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def diffusers_version() -> str:
    """The installed diffusers' version, recorded with every cell."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "not installed"


def scheduler_class(entry) -> type:
    import diffusers

    return getattr(diffusers, entry.cls)


def discrete_sigmas(model: Any) -> Tensor | None:
    """The model's trained sigmas (increasing in t) if it is a discrete-time VP model."""
    if model is None:
        return None
    sigmas = getattr(model, "discrete_sigmas", None)
    if sigmas is None and getattr(model, "alphas_cumprod", None) is not None:
        a = torch.as_tensor(model.alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - a) / a).sqrt()
    return None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).cpu()


def is_flow(model: Any) -> bool:
    """A model says it is a flow-matching model with `flow = True` or describe()["prediction"]
    == "flow" (its Denoiser is still D(x, sigma) with x = x_t / (1 - s), sigma = s / (1 - s))."""
    if getattr(model, "flow", False) is True:
        return True
    try:
        return model.describe().get("prediction") == "flow"
    except Exception:
        return False


def time_axis(entry, model: Any) -> dict[str, Any]:
    """The config keys that fix the scheduler's time axis for `model` (None: the default one)."""
    if entry.kind in ("edm", "flow"):
        return {}
    sigmas = discrete_sigmas(model)
    if sigmas is None:
        return dict(DDPM)
    abar = 1 / (1 + sigmas**2)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return {"num_train_timesteps": len(betas), "trained_betas": betas.tolist()}


def build(entry, options: dict[str, Any], model: Any = None):
    """The entry's scheduler with the user's config options on `model`'s time axis, always fed
    eps (the adapter turns the Denoiser into eps, EDM's F or a velocity)."""
    if entry.kind == "flow" and model is not None and not is_flow(model):
        raise NotApplicable(
            f"{entry.name}: {entry.cls} integrates a flow-matching model (x_t = (1 - s) x0 + s eps); "
            f"model '{getattr(model, 'spec', '') or type(model).__name__}' does not declare itself "
            "one (Denoiser.flow = True)"
        )
    cls = scheduler_class(entry)
    config = {**time_axis(entry, model), **{k: options[k] for k in entry.config if k in options}}
    if entry.kind != "flow":
        config["prediction_type"] = "epsilon"
    try:
        with quiet(cls):
            return cls(**config)
    except Exception as exc:
        changed = {k: v for k, v in options.items() if k in entry.config and v != entry.config[k]}
        given = ", ".join(f"{k}={v}" for k, v in changed.items())
        raise UsageError(
            f"{entry.name}: {entry.cls} refuses {given or 'its defaults'}: {first_line(exc)}"
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def set_timesteps(scheduler, n: int, device: Any = None) -> None:
    with quiet(type(scheduler)):
        scheduler.set_timesteps(n, device=device)


def train_sigma(scheduler, t: Tensor | float) -> float:
    """sigma of integer DDPM timestep t on the scheduler's own alphas_cumprod."""
    a = float(scheduler.alphas_cumprod[int(t)])
    return math.sqrt((1 - a) / a)


def final_vp_sigma(scheduler) -> float:
    """Where DDIM / PNDM end: their last step goes to t - T // n, or to final_alpha_cumprod
    (1 with set_alpha_to_one) when that is below 0."""
    t = int(scheduler.timesteps[-1]) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a = float(scheduler.alphas_cumprod[t]) if t >= 0 else float(scheduler.final_alpha_cumprod)
    return math.sqrt(max(0.0, 1 - a) / a)


def grid(entry, scheduler, sigma_max: float) -> list[float]:
    """The decreasing, distinct sigmas (bench's axis) the network is evaluated at, in order,
    then the sigma the loop ends at (0 if it ends at 0): what Plan.sigmas gives. `sigma_max`
    stands for s = 1 of a flow scheduler (sigma = infinity)."""
    if entry.kind == "flow":
        values = [sigma_max if s >= 1 else s / (1 - s) for s in scheduler.sigmas.double().tolist()]
    elif entry.kind == "vp":  # the sigma of each DDPM timestep, then where the last step lands
        end = float(scheduler.sigmas[-1]) if hasattr(scheduler, "sigmas") else final_vp_sigma(scheduler)
        values = [train_sigma(scheduler, t) for t in scheduler.timesteps] + [end]
    else:
        values = scheduler.sigmas.double().tolist()
    out: list[float] = []
    for value in values:
        if out and value == out[-1]:
            continue  # Heun and PNDM evaluate at a time step twice
        if out and value > out[-1]:
            raise Infeasible(
                f"{entry.name}: the time steps map to sigmas that do not decrease ({out[-1]:.4g} then "
                f"{value:.4g}); with a flow model, s = 1 stands for the model's sigma_max"
            )
        out.append(value)
    return out


def plan_sigmas(entry, options: dict[str, Any], n: int, denoiser: Any, device: Any) -> Tensor:
    """Plan.sigmas: the sigmas the scheduler visits on this model, in bench's sigma axis."""
    scheduler = build(entry, options, denoiser)
    set_timesteps(scheduler, n)
    return torch.tensor(grid(entry, scheduler, float(denoiser.sigma_max)), dtype=torch.float64, device=device)
