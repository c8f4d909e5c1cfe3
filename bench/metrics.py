"""Built-in streaming metrics and the high-accuracy reference ODE solve.

Each metric keeps running sums only, so memory stays flat whatever the sample count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_fid import fid_statistics_to_metric

from .contracts import Batch, Denoiser, Metric, MetricContext, Value
from .errors import UsageError


@torch.no_grad()
def reference_solve(
    denoiser: Denoiser,
    x: Tensor,
    sigma_from: float,
    sigma_to: float = 0.0,
    steps: int = 256,
    sigma_tiny: float = 1e-6,
) -> Tensor:
    """Probability-flow ODE solution by classical RK4 in s = log(sigma), in float64.

    dx/ds = x - D(x, e^s). For sigma_to = 0 it integrates down to `sigma_tiny` and takes
    the final denoise there, whose error is O(sigma_tiny^2).
    """
    d = lambda x_, s: x_ - denoiser(x_, math.exp(s)).double()  # noqa: E731
    end = sigma_to if sigma_to > 0 else sigma_tiny
    x = x.double()
    s, h = math.log(sigma_from), (math.log(end) - math.log(sigma_from)) / steps
    for _ in range(steps):
        # One classical Runge-Kutta step of size h in log-sigma
        k1 = d(x, s)
        k2 = d(x + h / 2 * k1, s + h / 2)
        k3 = d(x + h / 2 * k2, s + h / 2)
        k4 = d(x + h * k3, s + h)
        x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return denoiser(x, end).double() if sigma_to == 0 else x


class _Moments:
    """Streaming mean and covariance of flattened samples in float64."""

    def __init__(self) -> None:
        self.n, self.sum, self.outer = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        flat = x.detach().double().reshape(len(x), -1).cpu()
        self.n += len(flat)
        self.sum = self.sum + flat.sum(0)
        self.outer = self.outer + flat.T @ flat

    def stats(self) -> dict[str, np.ndarray]:
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return {"mu": mean.numpy(), "sigma": cov.numpy()}


class FrechetToTruth:
    """Fréchet distance between the samples' Gaussian fit and the exact data moments."""

    def __init__(self, ctx: MetricContext) -> None:
        moments = getattr(ctx.denoiser, "moments", None)
        if moments is None:
            raise UsageError(
                f"metric 'fd' needs a model with known data moments (an analytic model); "
                f"'{ctx.model}' has none"
            )
        mean, cov = moments()
        self.truth = {"mu": mean.cpu().numpy(), "sigma": cov.cpu().numpy()}
        self.samples = _Moments()

    def update(self, batch: Batch) -> None:
        self.samples.update(batch.x0)

    def result(self) -> Mapping[str, Value]:
        # torch-fidelity computes the distance (its trace of the matrix square root)
        fd = fid_statistics_to_metric(self.samples.stats(), self.truth, verbose=False)
        return {"fd": Value(next(iter(fd.values())), n=self.samples.n)}


class RmseToReference:
    """RMSE of each sample to the reference ODE solution from the same initial noise."""

    def __init__(self, ctx: MetricContext) -> None:
        self.ctx = ctx
        self.per_sample: list[Tensor] = []

    def update(self, batch: Batch) -> None:
        key = ("reference", self.ctx.model, self.ctx.seed, batch.sigma_max, tuple(batch.indices.tolist()))
        if key not in self.ctx.cache:
            x_t = batch.eps.to(self.ctx.device).double() * batch.sigma_max
            self.ctx.cache[key] = reference_solve(self.ctx.denoiser, x_t, batch.sigma_max).cpu()
        ref = self.ctx.cache[key]
        err = (batch.x0.detach().double().cpu() - ref).reshape(len(ref), -1)
        self.per_sample.append(err.pow(2).mean(1).sqrt())

    def result(self) -> Mapping[str, Value]:
        r = torch.cat(self.per_sample)
        se = float(r.std() / math.sqrt(len(r))) if len(r) > 1 else None
        return {"rmse": Value(float(r.mean()), std=se, n=len(r))}


METRICS = [
    Metric(
        "fd",
        FrechetToTruth,
        "Fréchet distance of the samples to the true data distribution (analytic models)",
    ),
    Metric(
        "rmse",
        RmseToReference,
        "RMSE of each sample to a high-accuracy ODE solve from the same noise (mean, s.e.)",
    ),
]
