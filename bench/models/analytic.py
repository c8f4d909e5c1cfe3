"""Analytic models: data distributions whose denoiser is exact and closed form.

For x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and x = x0 + sigma * eps, the posterior over
components is r_k(x) ∝ w_k N(x; mu_k, s_k^2 + sigma^2) and
D(x, sigma) = sum_k r_k (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)).
They need no weights and run fast on the CPU, so they measure solver error alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..contracts import Denoiser, ModelSource


class GaussianMixture(Denoiser):
    """Exact denoiser of a diagonal Gaussian mixture in image shape (C, H, W).

    Computes in float64 and returns the input's dtype.
    """

    def __init__(self, mu: Tensor, var: Tensor, weights: Tensor, shape, name: str) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.name = name
        self.register_buffer("mu", mu.double().reshape(len(mu), -1))
        self.register_buffer("var", var.double().reshape(len(mu), -1))
        self.register_buffer("log_w", torch.log(weights.double() / weights.sum()))
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.sigma_data = float(self.moments()[1].diagonal().mean().sqrt())

    def data_samples(self, n: int, seed: int = 0) -> Tensor:
        """n draws from the mixture itself (float32 images), for the metrics' floor."""
        gen = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_w.exp().cpu(), n, replacement=True, generator=gen)
        z = torch.randn(n, self.mu.shape[1], generator=gen, dtype=torch.float64)
        x = self.mu.cpu()[k] + self.var.cpu()[k].sqrt() * z
        return x.float().reshape(n, *self.shape)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        xf = x.double().reshape(len(x), -1)  # [B, D]
        if bool((sigma == sigma[0]).all()):
            return self._shared_sigma(xf, sigma[0].double()).reshape(x.shape).to(x.dtype)
        s2 = sigma.double().reshape(-1, 1, 1) ** 2
        v = self.var.unsqueeze(0) + s2  # [B, K, D]
        # Responsibilities of the components given x
        diff = xf.unsqueeze(1) - self.mu
        logp = -0.5 * (diff**2 / v + torch.log(2 * math.pi * v)).sum(-1)
        r = torch.softmax(logp + self.log_w, dim=1)  # [B, K]
        # Posterior mean within each component, then mixed
        e = self.mu + self.var / v * diff
        return (r.unsqueeze(-1) * e).sum(1).reshape(x.shape).to(x.dtype)

    def _shared_sigma(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The same formula with one sigma for the batch, written as matrix products
        (sigma stays a tensor, so the result is differentiable in it)."""
        v = self.var + sigma**2  # [K, D]
        inv = 1 / v
        # (x - mu)^2 / v summed over D, expanded into products
        quad = (x * x) @ inv.T - 2 * x @ (self.mu * inv).T + (self.mu**2 * inv).sum(-1)
        logp = -0.5 * (quad + torch.log(2 * math.pi * v).sum(-1))
        r = torch.softmax(logp + self.log_w, dim=1)
        # sum_k r_k (mu_k sigma^2 / v_k + var_k / v_k x)
        return r @ (self.mu * sigma**2 * inv) + x * (r @ (self.var * inv))

    def moments(self) -> tuple[Tensor, Tensor]:
        """Exact mean and covariance of the data distribution (flattened)."""
        w = self.log_w.exp()
        mean = w @ self.mu
        second = torch.einsum("k,ki,kj->ij", w, self.mu, self.mu) + torch.diag(w @ self.var)
        return mean, second - torch.outer(mean, mean)

    def ode_solution(self, x: Tensor, sigma_from: float, sigma_to: float = 0.0) -> Tensor:
        """Closed-form probability-flow ODE solution; exists for a single component only.

        Per dimension y = x - mu obeys dy/dsigma = y sigma / (s^2 + sigma^2), so
        y(sigma_to) = y(sigma_from) sqrt((s^2 + sigma_to^2) / (s^2 + sigma_from^2)).
        """
        if len(self.mu) != 1:
            raise ValueError("the ODE has a closed-form solution for a single Gaussian only")
        mu, var = self.mu[0], self.var[0]
        y = x.double().reshape(len(x), -1) - mu
        scale = torch.sqrt((var + sigma_to**2) / (var + sigma_from**2))
        return (mu + y * scale).reshape(x.shape).to(x.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "components": len(self.mu), "analytic": self.name}


def _smooth_patterns(k: int, shape, gen: torch.Generator) -> Tensor:
    """k smooth image-like patterns in [-1, 1]: blurred random fields."""
    c, h, w = shape
    field = torch.randn(k, c, h, w, generator=gen, dtype=torch.float64)
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    blurred = torch.nn.functional.conv2d(
        field.reshape(k * c, 1, h, w), kernel[None, None], padding=1
    ).reshape(k, c, h, w)
    return torch.tanh(2 * blurred / blurred.std())


def mixture(shape=(1, 8, 8), components: int = 8, seed: int = 0) -> GaussianMixture:
    """The default analytic model: 8 image-like, well separated, unequally weighted modes."""
    gen = torch.Generator().manual_seed(seed)
    mu = _smooth_patterns(components, shape, gen)
    std = 0.05 + 0.25 * torch.rand(components, *shape, generator=gen, dtype=torch.float64)
    weights = 1.0 + torch.rand(components, generator=gen, dtype=torch.float64)
    return GaussianMixture(mu, std**2, weights, shape, name="mixture")


def gaussian(shape=(1, 8, 8), seed: int = 0) -> GaussianMixture:
    """A single diagonal Gaussian: its probability-flow ODE has a closed-form solution."""
    gen = torch.Generator().manual_seed(seed)
    mu = _smooth_patterns(1, shape, gen)
    std = 0.1 + 0.4 * torch.rand(1, *shape, generator=gen, dtype=torch.float64)
    return GaussianMixture(mu, std**2, torch.ones(1), shape, name="gaussian")


def parse_shape(arg: str | None, default=(1, 8, 8)) -> tuple[int, int, int]:
    """`3x16x16` -> (3, 16, 16)."""
    if not arg:
        return tuple(default)
    from ..errors import UsageError

    try:
        c, h, w = (int(v) for v in arg.lower().split("x"))
    except ValueError:
        raise UsageError(f"model shape '{arg}' is not CxHxW, e.g. 3x8x8") from None
    return (c, h, w)


def _load_mixture(arg, device=None, **_):
    return mixture(shape=parse_shape(arg))


def _load_gaussian(arg, device=None, **_):
    return gaussian(shape=parse_shape(arg))


SOURCES = [
    ModelSource(
        "mixture",
        _load_mixture,
        "analytic 8-component Gaussian mixture, exact denoiser (mixture[:CxHxW], default 1x8x8)",
        default_metrics=("fd", "reference"),
    ),
    ModelSource(
        "gaussian",
        _load_gaussian,
        "analytic single Gaussian, closed-form ODE solution (gaussian[:CxHxW])",
        default_metrics=("fd", "reference"),
    ),
]
