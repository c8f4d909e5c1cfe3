"""Metrics of the analytic models, whose data distribution is known exactly: `fd`, the
Fréchet distance of the samples to the true data moments (torch-fidelity's distance), with
its bootstrap standard error; and the Fréchet machinery the feature-space metrics share
(streamed moments, replicates by weighted moments and batched eigenvalues).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from ..contracts import Batch, Metric, MetricContext, Value
from ..errors import UsageError
from ..stats import Bootstrapped, bootstrap_b, counts

# Elements of one block of intermediate products in `frechet_replicates` (32 MB in float64)
BLOCK = 1 << 22


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


def sqrt_psd(sigma: Tensor) -> Tensor:
    """The symmetric square root of a covariance (float64, by eigh; negative eigenvalues,
    rounding error of a PSD matrix, clipped to 0)."""
    sigma = sigma.double()
    lam, vec = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vec * lam.clamp(min=0).sqrt()) @ vec.T


@torch.no_grad()
def frechet_replicates(
    x: Tensor,
    mu_ref: np.ndarray | Tensor,
    sigma_ref: np.ndarray | Tensor,
    index_sets: np.ndarray,
    *,
    sigma_ref_sqrt: Tensor | None = None,
    device: torch.device | str | None = None,
    cache: dict | None = None,
) -> np.ndarray:
    """Fréchet distance of resampled rows of `x` [n, d] to fixed moments, one a row of
    `index_sets` [B, n]: float64 [B].

    Replicate b weighs sample i by its count w_i in row b: mean mu_b = sum_i w_i x_i / n
    and covariance S_b = sum_i w_i (x_i - mu_b)(x_i - mu_b)^T / (n - 1) (what
    `_Moments` gives on the resampled set), and FD = |mu_b - mu_ref|^2 + tr S_b + tr S_ref
    - 2 tr sqrt(R S_b R), R = sqrt(S_ref) computed once (torch-fidelity's tr sqrtm(S_b
    S_ref): the same eigenvalues). With Z = (x - mean) R, R S_b R is Z's weighted
    covariance: for d <= 128 all B of them come from one product of the counts with the
    per-sample outer products; for larger d one d x n x d product each; for n < d the
    nonzero eigenvalues come from the n x n weighted Gram matrix of Z instead. All in
    float64 on `device` (default: x's), eigenvalues by batched eigvalsh. R comes from
    `sigma_ref_sqrt`, else from `cache["sigma_sqrt"]` (a dict kept with the reference,
    filled on first use), else is computed (one d x d eigh: ~2.4 s at d = 2048 on one core).
    Cost: B (n d^2 + d^3) for n >= d, B n^3 for n < d (which needs no R: Z Z^T = X S_ref X^T).
    """
    device = torch.device(device) if device is not None else x.device
    f = x.detach().reshape(len(x), -1).to(device, torch.float64)
    n, d = f.shape
    w = torch.from_numpy(counts(index_sets, n)).to(device)
    mu_ref = torch.as_tensor(np.asarray(mu_ref), dtype=torch.float64, device=device)
    sigma_ref = torch.as_tensor(np.asarray(sigma_ref), dtype=torch.float64, device=device)
    center = f.mean(0)
    xc = f - center
    mean = w @ xc / n  # mu_b - center, [B, d]
    mean_term = (mean + (center - mu_ref)).pow(2).sum(1)
    trace = (w @ xc.pow(2).sum(1) - n * mean.pow(2).sum(1)) / (n - 1)
    tr_sqrt = torch.empty(len(w), dtype=torch.float64, device=device)

    def roots(m: Tensor) -> Tensor:
        return torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum(-1)

    if n < d:
        # Nonzero eigenvalues of Y^T Y equal those of Y Y^T, Y = diag(sqrt w)(Z - 1 zbar^T)
        gram = xc @ sigma_ref @ xc.T  # Z Z^T
        step = max(1, BLOCK // (n * n))
        for lo in range(0, len(w), step):
            wb = w[lo : lo + step]
            g = wb @ gram / n  # G w / n, [b, n]
            s = (wb * g).sum(1) / n
            a = gram - g[:, None, :] - g[:, :, None] + s[:, None, None]
            sw = wb.sqrt()
            tr_sqrt[lo : lo + step] = roots(sw[:, :, None] * a * sw[:, None, :] / (n - 1))
    else:
        if sigma_ref_sqrt is None and cache is not None:
            sigma_ref_sqrt = cache.get("sigma_sqrt")
        if sigma_ref_sqrt is None:
            sigma_ref_sqrt = sqrt_psd(sigma_ref)
            if cache is not None:
                cache["sigma_sqrt"] = sigma_ref_sqrt
        z = xc @ sigma_ref_sqrt.to(device, torch.float64)
        zbar = w @ z / n
        if d <= 128:
            second = torch.zeros(len(w), d * d, dtype=torch.float64, device=device)
            step = max(1, BLOCK // (d * d))
            for lo in range(0, n, step):
                zc = z[lo : lo + step]
                second += w[:, lo : lo + step] @ (zc[:, :, None] * zc[:, None, :]).reshape(len(zc), -1)
            m = (second.reshape(-1, d, d) - n * zbar[:, :, None] * zbar[:, None, :]) / (n - 1)
            for lo in range(0, len(w), step):
                tr_sqrt[lo : lo + step] = roots(m[lo : lo + step])
        else:
            for b in range(len(w)):
                m = ((z.T * w[b]) @ z - n * torch.outer(zbar[b], zbar[b])) / (n - 1)
                tr_sqrt[b] = roots(m)
    fd = mean_term + trace + torch.trace(sigma_ref) - 2 * tr_sqrt
    return fd.cpu().numpy()


class FrechetToTruth(Bootstrapped):
    """Fréchet distance between the samples' Gaussian fit and the exact data moments.

    The point value is torch-fidelity's distance of the streamed moments; `std` is the
    bootstrap standard error over samples (`frechet_replicates`, B from the run's metric
    option `bootstrap`, default 200).
    """

    def __init__(self, ctx: MetricContext) -> None:
        moments = ctx.denoiser.moments
        if moments is None:
            raise UsageError(
                f"metric 'fd' needs a model with known data moments (an analytic model); "
                f"'{ctx.model}' has none"
            )
        mean, cov = moments()
        self.truth = {"mu": mean.cpu().numpy(), "sigma": cov.cpu().numpy()}
        self.samples = _Moments()
        self.parts: list[Tensor] = []
        self.device = ctx.device
        self.bootstrap_b = bootstrap_b(ctx.options)
        self._root: dict[str, Tensor] = {}  # sqrt of the truth's covariance, once

    def update(self, batch: Batch) -> None:
        self.samples.update(batch.x0)
        self.parts.append(batch.x0.detach().double().reshape(len(batch.x0), -1).cpu())

    def _count(self) -> int:
        return self.samples.n

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        x, truth = torch.cat(self.parts), self.truth
        fd = frechet_replicates(
            x, truth["mu"], truth["sigma"], index_sets, device=self.device, cache=self._root
        )
        return {"fd": fd}

    def result(self) -> Mapping[str, Value]:
        from torch_fidelity.metric_fid import fid_statistics_to_metric

        # torch-fidelity computes the distance (its trace of the matrix square root)
        fd = fid_statistics_to_metric(self.samples.stats(), self.truth, verbose=False)
        std = self.bootstrap_std().get("fd")
        return {"fd": Value(next(iter(fd.values())), std=std, n=self.samples.n)}


def _has_moments(ctx: MetricContext) -> str | None:
    if ctx.denoiser.moments is None:
        return "it needs a model with known data moments (an analytic model: mixture, gaussian)"
    return None


METRICS = [
    Metric(
        "fd",
        FrechetToTruth,
        "Fréchet distance of the samples to the true data distribution (analytic models)",
        floor=True,
        applies=_has_moments,
        answers="closest to the data",
    ),
]


