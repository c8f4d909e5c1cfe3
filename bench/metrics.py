"""Built-in streaming metrics and the high-accuracy reference ODE solve.

Each metric keeps running sums for its point value, plus what its bootstrap needs: the
per-sample errors (rmse) or the flattened samples (fd, d floats a sample). Every state
has `replicates(index_sets)` (see `bench.stats`): the metric recomputed on resampled
sample positions, against the same fixed reference.

- fd: `Value.std` is the bootstrap standard error over samples (`frechet_replicates`:
  weighted moments per replicate, the trace square root from eigenvalues of
  sqrt(S_ref) S sqrt(S_ref), batched in float64).
- rmse: a mean of per-sample errors, so its plain standard error s / sqrt(n) is exact
  (the bootstrap standard error tends to it, times sqrt((n - 1) / n)); that is its std.

torch-fidelity is imported when a distance is computed, not with this module.

Which metrics score a model's cells (`metric_set`), and whether they can, is settled
before any cell runs. The set is the one named (`--metrics`), else the model source's own
(`default_metrics`), else the metrics that declare the model's image shape
(`Metric.default_for`: a 1x28x28 model gets `fid-mnist` and `kid-mnist`), else `reference`
(the error to a converged solve of the model's own ODE), which needs no data and no feature
network: every model has a metric. Each record says which set it used and why
(`metric_set`). Once a model is loaded, every metric of its cells that declares `applies` is
asked whether it can score it; the first that cannot stops the run with its
one-line reason (exit 2), before any of the model's cells samples.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .contracts import Batch, Denoiser, Metric, MetricContext, Value
from .errors import UsageError
from .stats import Bootstrapped, bootstrap_b, counts

# Elements of one block of intermediate products in `frechet_replicates` (32 MB in float64)
BLOCK = 1 << 22


@torch.no_grad()
def reference_solve(
    denoiser: Denoiser,
    x: Tensor,
    sigma_from: float,
    sigma_to: float = 0.0,
    steps: int = 256,
    sigma_tiny: float = 1e-6,
) -> Tensor:
    """Probability-flow ODE solution by classical RK4 in s = log(sigma), the state in float64.

    dx/ds = x - D(x, e^s). For sigma_to = 0 it integrates down to `sigma_tiny` and takes
    the final denoise there, whose error is O(sigma_tiny^2). The network sees its own dtype
    (a float32 network gets float32 inputs; an analytic model computes in float64).
    """
    from .reference import network_dtype

    dtype = network_dtype(denoiser)
    D = lambda x_, sigma: denoiser(x_.to(dtype), sigma).double()  # noqa: E731
    d = lambda x_, s: x_ - D(x_, math.exp(s))  # noqa: E731
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
    return D(x, end) if sigma_to == 0 else x


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


class RmseToReference(Bootstrapped):
    """RMSE of each sample to the reference ODE solution from the same initial noise.

    The value is the mean of the per-sample RMSEs; its std the plain standard error
    s / sqrt(n), exact for a mean (the bootstrap's tends to it); replicates are the
    weighted means of the per-sample RMSEs.
    """

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

    def _count(self) -> int:
        return sum(len(r) for r in self.per_sample)

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        r = torch.cat(self.per_sample).double().numpy()
        return {"rmse": counts(index_sets, len(r)) @ r / len(r)}

    def result(self) -> Mapping[str, Value]:
        r = torch.cat(self.per_sample)
        se = float(r.std() / math.sqrt(len(r))) if len(r) > 1 else None
        return {"rmse": Value(float(r.mean()), std=se, n=len(r))}


def image_shape(denoiser: Denoiser) -> tuple[int, int, int]:
    """(C, H, W) of the images metrics see: the model's shape through its decode (one call
    on a zero latent, once per model; a pixel-space model's decode is the identity)."""
    known = _IMAGE_SHAPES.get(denoiser)
    if known is None:
        tensors = (*denoiser.parameters(), *denoiser.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        with torch.no_grad():
            x = denoiser.decode(torch.zeros(1, *denoiser.shape, device=device))
        known = _IMAGE_SHAPES[denoiser] = tuple(int(v) for v in x.shape[1:])
    return known


_IMAGE_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    ),
    Metric(
        "rmse",
        RmseToReference,
        "RMSE of each sample to a high-accuracy ODE solve from the same noise (mean, s.e.)",
    ),
]


# --- Which metrics a model's cells use, and whether they can score it ------------------


FALLBACK = ("reference",)  # the metrics of a model with none of its own
RUN_OPTIONS = {"bootstrap": 200}  # metric options every metric reads (bench.stats)


def metric_set(registry, metrics: list[str] | None, model_spec: str,
               model: Denoiser | None = None) -> tuple[list[str], str]:
    """(metric names, why them) for a model's cells: those named, else the model source's
    own, else (for a loaded `model`) the metrics declared for its image shape
    (`Metric.default_for`), else `reference`."""
    if metrics is not None:
        return list(metrics), "named by --metrics"
    source = registry.get("models", model_spec.partition(":")[0])
    if source.default_metrics:
        return list(source.default_metrics), f"the own metrics of model source '{source.name}'"
    shape = image_shape(model) if model is not None else None
    by_shape = [m.name for m in registry.items["metrics"].values() if shape in m.default_for]
    if by_shape:
        size = "x".join(map(str, shape))
        return by_shape, (f"model source '{source.name}' has no metric of its own; its images are {size}: "
                          "the metrics declared for that shape")
    return list(FALLBACK), (f"model source '{source.name}' has no metric of its own: the error to a "
                            "converged solve of its ODE from the same noise")


def known_options(registry) -> dict[str, Any]:
    """Every metric option an installed metric reads, with its default."""
    out = dict(RUN_OPTIONS)
    for metric in registry.table("metrics").values():
        out.update(getattr(metric, "options", None) or {})
    return out


def check_options(registry, options: Mapping[str, Any]) -> None:
    """A UsageError for a metric option no installed metric reads."""
    known = known_options(registry)
    for key in options:
        if key not in known:
            raise UsageError(f"--metric-option: no metric reads '{key}'; known: {', '.join(sorted(known))}")


def check_applies(registry, names: list[str], model_spec: str, denoiser: Denoiser, ctx_args: dict) -> None:
    """Every metric of the model's cells can score it, or a one-line UsageError naming why not.

    `ctx_args` are the MetricContext's other fields (num_samples, seed, device, cache, options)."""
    ctx = MetricContext(model_spec, denoiser, **ctx_args)
    for name in names:
        metric = registry.get("metrics", name)
        if metric.applies is None:
            continue
        with torch.no_grad():
            why = metric.applies(ctx)
        if why:
            raise UsageError(f"metric '{metric.name}' cannot score model '{model_spec}': {why}")
