"""Adapters: any network parameterization wrapped into the Denoiser contract at the edge.

Karras et al. (2022), Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).
`Preconditioned` covers continuous-time EDM, VP and VE networks; `DiscreteVP` covers
DDPM-style networks on integer timesteps with alphas_cumprod (eps, v or x0 prediction);
`Flow` covers flow-matching (rectified flow) networks on x_t = (1 - t) x0 + t eps.

A public module: a plugin's model source (`bench.ModelSource`) or a factory adapts its
network with these, as the built-in sources do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .contracts import Denoiser
from .errors import UsageError

PREDICTIONS = ("epsilon", "v_prediction", "sample")

NetFn = Callable[..., Tensor]


def vp_output(x_vp: Tensor, f: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """x0 from a VP network's output F at x_vp = x / sqrt(1 + sigma^2).

    With alpha_bar = 1 / (1 + sigma^2): eps -> x0 = (x_vp - sqrt(1 - a) eps) / sqrt(a);
    v -> x0 = sqrt(a) x_vp - sqrt(1 - a) v; sample -> x0 = F.
    """
    s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
    root = torch.sqrt(1 + s**2)
    if prediction == "epsilon":
        return x_vp * root - s * f
    if prediction == "v_prediction":
        return (x_vp - s * f) / root
    if prediction == "sample":
        return f
    raise UsageError(f"unknown prediction '{prediction}'; use one of {', '.join(PREDICTIONS)}")


class Preconditioned(Denoiser):
    """A continuous-time network `net(x_in, c_noise, **cond)` with EDM, VP or VE
    preconditioning (EDM's EDMPrecond / VPPrecond / VEPrecond).

    With `has_bottleneck=True` the network accepts `return_bottleneck=True` and returns
    `(F, feature)`; the denoiser then returns `(x0_hat, feature)` from that one call."""

    def __init__(self, net: torch.nn.Module, kind: str, shape, *, sigma_data: float = 0.5,
                 prediction: str = "epsilon", sigma_min: float | None = None,
                 sigma_max: float | None = None, beta_d: float = 19.9, beta_min: float = 0.1,
                 M: int = 1000, epsilon_t: float = 1e-5, has_bottleneck: bool = False) -> None:
        super().__init__()
        self.has_bottleneck = has_bottleneck
        if kind not in ("edm", "vp", "ve"):
            raise UsageError(f"unknown preconditioning '{kind}'; use edm, vp or ve")
        self.net, self.kind, self.shape, self.prediction = net, kind, tuple(shape), prediction
        self.sigma_data, self.beta_d, self.beta_min, self.M = sigma_data, beta_d, beta_min, M
        default_min, default_max = {
            "edm": (0.002, 80.0),
            "vp": (self.vp_sigma(epsilon_t), self.vp_sigma(1.0)),
            "ve": (0.02, 100.0),
        }[kind]
        self.sigma_min = sigma_min if sigma_min is not None else default_min
        self.sigma_max = sigma_max if sigma_max is not None else default_max

    def vp_sigma(self, t: float) -> float:
        return math.sqrt(math.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

    def vp_sigma_inv(self, sigma: Tensor) -> Tensor:
        root = (self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt()
        return (root - self.beta_min) / self.beta_d

    def forward(self, x: Tensor, sigma: Tensor, return_bottleneck: bool = False, **cond: Any):
        if not return_bottleneck:
            return self.precondition(x, sigma, self.net, **cond)
        # One network call that also returns the bottleneck feature, passed through as is
        feature = []

        def net(*args: Any, **kwargs: Any) -> Tensor:
            f, h = self.net(*args, return_bottleneck=True, **kwargs)
            feature.append(h)
            return f

        return self.precondition(x, sigma, net, **cond), feature[0]

    def precondition(self, x: Tensor, sigma: Tensor, net: NetFn, **cond: Any) -> Tensor:
        """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) for this kind, F = `net`."""
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        if self.kind == "edm":
            # EDM: c_skip x + c_out F(c_in x, ln(sigma) / 4)
            sd = self.sigma_data
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = s * sd / (s**2 + sd**2).sqrt()
            c_in = 1 / (sd**2 + s**2).sqrt()
            return c_skip * x + c_out * net(c_in * x, sigma.log() / 4, **cond)
        if self.kind == "vp":
            # VP: the network sees x_vp and (M - 1) t(sigma); its output is eps, v or x0
            x_vp = x / (1 + s**2).sqrt()
            f = net(x_vp, (self.M - 1) * self.vp_sigma_inv(sigma), **cond)
            return vp_output(x_vp, f, sigma, self.prediction)
        # VE: x + sigma F(x, ln(sigma / 2))
        return x + s * net(x, (0.5 * sigma).log(), **cond)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "preconditioning": self.kind, "prediction": self.prediction}


class DiscreteVP(Denoiser):
    """A DDPM-style network `net_fn(x_vp, t, **cond)` on integer timesteps t = 0..T-1.

    sigma_t = sqrt((1 - a_t) / a_t) for alphas_cumprod a_t. A sigma is mapped to its
    timestep by nearest neighbour in log sigma (`round_sigma` snaps to the same grid),
    so the network only ever sees the timesteps it was trained on.
    """

    def __init__(self, net_fn: NetFn, alphas_cumprod: Tensor, shape, *,
                 prediction: str = "epsilon", net: torch.nn.Module | None = None,
                 sigma_data: float = 0.5) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction '{prediction}'; use one of {', '.join(PREDICTIONS)}")
        self.net_fn, self.net, self.prediction = net_fn, net, prediction
        self.shape, self.sigma_data = tuple(shape), sigma_data
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("discrete_sigmas", ((1 - a) / a).sqrt())  # increasing in t
        self.sigma_min = float(self.discrete_sigmas[0])
        self.sigma_max = float(self.discrete_sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Index of the nearest trained sigma, in log space."""
        log_sigmas = self.discrete_sigmas.log().to(sigma.device)
        dist = (sigma.double().clamp_min(1e-12).log().reshape(-1, 1) - log_sigmas).abs()
        return dist.argmin(dim=1)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma)
        t = self.sigma_to_t(sigma.reshape(-1))
        return self.discrete_sigmas.to(sigma.device)[t].reshape(sigma.shape).to(sigma.dtype)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        t = self.sigma_to_t(sigma)
        sig = self.discrete_sigmas.to(x.device)[t].to(x.dtype)
        x_vp = x / (1 + sig.reshape(-1, 1, 1, 1) ** 2).sqrt()
        return vp_output(x_vp, self.net_fn(x_vp, t, **cond), sig, self.prediction)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "time": "discrete", "timesteps": len(self.discrete_sigmas),
                "prediction": self.prediction}


FLOW_PREDICTIONS = ("velocity", "sample", "epsilon")


class Flow(Denoiser):
    """A flow-matching (rectified flow) network `net_fn(x_t, t * time_scale, **cond)` on
    x_t = (1 - t) x0 + t eps, t in [0, 1], predicting the velocity v = eps - x0
    ("velocity", SD3 / Flux / SiT), x0 ("sample") or eps ("epsilon").

    This is the sigma formulation exactly: x_t = (1 - t) x_sigma with sigma = t / (1 - t),
    so t = sigma / (1 + sigma), x_t = x / (1 + sigma) and D(x, sigma) = x_t - t v. The
    samplers are unchanged. t = 1 is sigma = inf, so the range is [t_min, t_max] in t
    (sigma_max = t_max / (1 - t_max)); starting at t_max from eps * sigma_max differs from
    the true x_{t_max} by (1 - t_max) x0.

    `flow = True` tells plugins it is a flow model; `default_schedule` ("flow": uniform in
    t, bench-classic) is the schedule a run uses where the method names none.
    """

    flow = True

    def __init__(self, net_fn: NetFn, shape, *, prediction: str = "velocity",
                 net: torch.nn.Module | None = None, time_scale: float = 1.0,
                 t_min: float = 1e-3, t_max: float = 1 - 1e-3, sigma_data: float = 0.5,
                 default_schedule: str | None = "flow") -> None:
        super().__init__()
        self.default_schedule = default_schedule
        if prediction not in FLOW_PREDICTIONS:
            raise UsageError(f"unknown flow prediction '{prediction}'; "
                             f"use one of {', '.join(FLOW_PREDICTIONS)}")
        if not 0 < t_min < t_max < 1:
            raise UsageError(f"flow time range [{t_min}, {t_max}] must satisfy 0 < t_min < t_max < 1")
        self.net_fn, self.net, self.prediction = net_fn, net, prediction
        self.shape, self.sigma_data, self.time_scale = tuple(shape), sigma_data, time_scale
        self.t_min, self.t_max = t_min, t_max
        self.sigma_min, self.sigma_max = t_min / (1 - t_min), t_max / (1 - t_max)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        # x_t and t from x_sigma and sigma; the network sees t on its own time scale
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        t = s / (1 + s)
        x_t = x / (1 + s)
        f = self.net_fn(x_t, (t.reshape(-1) * self.time_scale).to(x.dtype), **cond)
        if self.prediction == "velocity":
            return x_t - t * f
        if self.prediction == "sample":
            return f
        return (x_t - t * f) / (1 - t)  # epsilon

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "time": "flow", "prediction": self.prediction,
                "time_scale": self.time_scale, "t_min": self.t_min, "t_max": self.t_max,
                **({"default_schedule": self.default_schedule} if self.default_schedule else {})}
