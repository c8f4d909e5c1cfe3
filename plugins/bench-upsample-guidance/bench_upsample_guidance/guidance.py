"""Upsample guidance (Hwang, Park, Jo 2024, "Upsample Guidance: Scale Up Diffusion Models
without Training"), derived in the sigma formulation x = x0 + sigma * eps.

Sample at m times the trained resolution with the same network. Let D_m be m x m
average pooling and U_m nearest upsampling (D_m U_m = identity). Pooling the noisy image,

    D_m(x) = D_m(x0) + sigma D_m(eps),   D_m(eps) ~ N(0, I / m^2),

so D_m(x) is the low-resolution image D_m(x0) at noise level sigma / m: the model's own
denoiser at its trained resolution applies, D_hat(D_m(x), sigma / m). (On the VP axis
this is the paper's power fix P_t = abar_t + (1 - abar_t) / m^2 and its time alignment
SNR(tau) = m^2 SNR(t); in sigma units both reduce to sigma -> sigma / m.) The paper
corrects the low-frequency part of the noise prediction,

    eps_g = eps_hat(x, sigma) + w U_m[ eps_low / m - D_m(eps_hat(x, sigma)) ],

with eps_low / m the estimate of D_m(eps). With eps = (x - D) / sigma for both, and
sigma eps_low / m = D_m(x) - D_hat(D_m(x), sigma / m), the x-terms cancel and

    D_g(x, sigma) = D_hat(x, sigma) + w U_m[ D_hat(D_m(x), sigma / m) - D_m(D_hat(x, sigma)) ].

With w = 1 the pooled prediction is exactly the low-resolution one. w is applied on the
noisiest fraction eta of the trajectory, measured on the VP time axis as in the paper
(beta_min = 0.1, beta_d = 19.9): guidance is on while t(sigma) > (1 - eta) t(sigma_max).
Each guided evaluation costs one extra network call at 1/m^2 of the pixels.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bench import Denoiser, DenoiserWrapper
from bench.errors import NotApplicable, UsageError

OPTIONS = {"m": 2, "w": 1.0, "eta": 0.5}
BETA_MIN, BETA_D = 0.1, 19.9


def pool(x: Tensor, m: int) -> Tensor:
    """D_m: m x m average pooling."""
    return F.avg_pool2d(x, m)


def upsample(x: Tensor, m: int) -> Tensor:
    """U_m: nearest-neighbour upsampling by m (D_m U_m = identity)."""
    return x.repeat_interleave(m, dim=-2).repeat_interleave(m, dim=-1)


def vp_time(sigma: Tensor | float) -> Tensor:
    """t(sigma) of the VP SDE: sigma^2 = exp(beta_d t^2 / 2 + beta_min t) - 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return ((BETA_MIN**2 + 2 * BETA_D * torch.log1p(sigma**2)).sqrt() - BETA_MIN) / BETA_D


def vp_sigma(t: float) -> float:
    """sigma(t) of the VP SDE, the inverse of `vp_time`."""
    return math.sqrt(math.expm1(0.5 * BETA_D * t**2 + BETA_MIN * t))


class UpsampleGuided(DenoiserWrapper):
    """D_g(x, sigma) at m times the resolution of `inner` (see the module docstring)."""

    def __init__(self, inner: Denoiser, m: int, w: float, eta: float) -> None:
        super().__init__(inner)
        self.m, self.w, self.eta = m, w, eta
        c, h, wd = inner.shape
        self.shape, self.has_bottleneck = (c, m * h, m * wd), False
        # Guidance is on above this time on the VP axis (never when w = 0)
        self.t_on = (1 - eta) * float(vp_time(inner.sigma_max))
        self.sigma_on = vp_sigma(self.t_on)
        self.applied = (
            f"upsample-guidance:m={m}:w={w:g}:eta={eta:g} ({'x'.join(map(str, self.shape))} "
            f"from {'x'.join(map(str, inner.shape))}; low-resolution call at sigma/{m} "
            f"while sigma > {self.sigma_on:.4g})"
        )

    def active(self, sigma: Tensor) -> Tensor:
        """Per sample: is guidance on at this sigma?"""
        on = vp_time(sigma.detach().cpu()) > self.t_on
        return on.to(sigma.device) & (self.w != 0)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        # The prediction at full resolution
        d_full = self.inner(x, sigma, **cond)
        active = self.active(sigma)
        if not bool(active.any()):
            return d_full
        # The low-resolution prediction of the pooled input at sigma / m
        d_low = self.inner(pool(x, self.m), sigma / self.m, **cond)
        # Replace (w = 1) or push (w > 1) the low frequencies of D toward it
        w = self.w * active.to(x.dtype).reshape(-1, 1, 1, 1)
        return d_full + w * upsample(d_low - pool(d_full, self.m), self.m)

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "shape": list(self.shape),
            "upsample_guidance": {"m": self.m, "w": self.w, "eta": self.eta},
        }


def check_runs_at(denoiser: Denoiser, shape: tuple[int, int, int]) -> None:
    """NotApplicable unless the network accepts inputs of `shape` (one probe call)."""
    tensors = chain(denoiser.parameters(), denoiser.buffers())
    x = torch.zeros(1, *shape, device=next(tensors, torch.zeros(())).device)
    try:
        with torch.no_grad():
            out = denoiser(x, denoiser.sigma_max)
        if tuple(out.shape[1:]) != shape:
            raise ValueError(f"it returned {tuple(out.shape[1:])}")
    except Exception as exc:
        size = "x".join(map(str, shape))
        raise NotApplicable(
            f"upsample-guidance is not applicable to model '{denoiser.spec or type(denoiser).__name__}': "
            f"it cannot denoise {size} inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from None


def apply(denoiser: Denoiser, m: int = 2, w: float = 1.0, eta: float = 0.5) -> Denoiser:
    """The modifier: sample at m x the model's resolution with guidance weight w on the
    noisiest fraction eta of the trajectory; w = 0 is plain sampling at that resolution."""
    if int(m) != m or m < 2:
        raise UsageError(f"upsample-guidance: m={m} must be an integer >= 2")
    if not 0 <= eta <= 1:
        raise UsageError(f"upsample-guidance: eta={eta} is a fraction of the trajectory, in [0, 1]")
    guided = UpsampleGuided(denoiser, int(m), float(w), float(eta))
    check_runs_at(denoiser, guided.shape)
    return guided
