"""Feature-space metrics computed by torch-fidelity's own functions, fed batch by batch.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and improved precision/recall
(Kynkäänniemi et al. 2019) compare the samples' features with a reference set's:

- `fid-digits`, `kid-digits`, `pr-digits`: features of `digits-classifier-v1` (see
  `bench.metrics.digits_classifier`) against all 1797 scikit-learn digits, shipped in bench/assets.
- `fid-mnist`, `kid-mnist`, `pr-mnist`: features of `mnist-classifier-v1` (see
  `bench.metrics.mnist_classifier`) against MNIST's 10,000 test images, shipped in bench/assets.
  Their floor's real data is the model's own, else 10,000 MNIST training images
  (`bench.data.mnist_samples`), so any 28x28 model gets one; `fid-mnist` and `kid-mnist`
  are the default metrics of a 1x28x28 model whose source names none.
- `fid-inception`: pool3 features (2048-d) of torch-fidelity's `inception-v3-compat`
  (the TF-Inception port EDM's protocol uses); weights from torch-fidelity's cache or
  `--fid-weights PATH`; reference from `--ref-stats`: an EDM-style .npz of mu/sigma, an
  image folder, or a torch-fidelity dataset name such as cifar10-train.

Streaming: samples arrive in [-1, 1] and are quantised to uint8 as EDM saves them
(x * 127.5 + 128, clipped), then reduced to features at once. FID keeps the running
mean and covariance of the features (float64) and hands them to
`fid_statistics_to_metric`; KID (`kid_features_to_metric`) and precision/recall
(`prc_features_to_metric`, distance blocks capped in size) take float64 features. Every
state keeps the features of its samples (d floats a sample: 64 for digits, 2048 for
Inception) for its bootstrap.

Uncertainty: every value's `std` is a bootstrap standard error over samples (resample
the n sample features with replacement, recompute against the fixed reference; B from
the run's metric option `bootstrap`, default `bench.stats.DEFAULT_B`), and every state
has `replicates(index_sets)` for paired comparisons (`bench.stats`):

- FID: `bench.metrics.analytic.frechet_replicates` (weighted moments per replicate; tr sqrt from
  the eigenvalues of sqrt(S_ref) S sqrt(S_ref), batched in float64). B = 200 on the 64-d
  digits features: 0.02 / 0.05 / 0.09 s at n = 256 / 1000 / 2000 (one core, measured).
  On 2048-d Inception features each replicate costs n d^2 + d^3 (an n x n Gram
  eigenproblem for n < d): one core measured 0.2 / 0.9 / 2.0 s a replicate at
  n = 1000 / 2000 / 5000, plus sqrt(S_ref) once (2.4 s), so B = 200 at n = 5000 is ~7
  minutes and at n = 50k ~45 (extrapolated). Lower B with the metric option `bootstrap`
  (it sets the B of `std`; the harness chooses its own for `replicates`) or run on a GPU:
  the states compute on the run's device.
- KID: the same 10 subsets as torch-fidelity's point value (its RandomState(2020)
  draws), applied to the resampled positions; within a subset the unbiased MMD^2 with
  pairs of identical source samples excluded (a repeated draw paired with itself is the
  diagonal k(x, x) the unbiased estimator leaves out), i.e. the U-statistic of the
  resampled subset. Cost B n^2 (n <= 1000, where every subset is all samples) or 10 B n^2.
- precision: a mean of per-sample indicators (inside a reference ball), so a replicate
  is the mean of the resampled indicators, exactly.
- recall: the samples' k-NN radii recomputed on the resampled multiset (a draw's own
  copies are not its neighbours, other draws count with multiplicity), then the share
  of reference points inside the balls of the drawn samples. Cost B N n comparisons.

torch-fidelity (and torchvision, which it imports) load when a metric is created or
computed, never with this module, so the plugin registry's import stays fast.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..contracts import Batch, Metric, MetricContext, Value
from ..data import mnist_samples
from ..errors import ModelLoadError, UsageError
from ..models.download import fetch, offline
from ..stats import Bootstrapped, bootstrap_b, counts
from . import image_shape
from .analytic import _Moments, frechet_replicates

if TYPE_CHECKING:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

INCEPTION, INCEPTION_LAYER, INCEPTION_DIM = "inception-v3-compat", "2048", 2048
# Path(torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3).name (a test checks it)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")
# KID: 10 subsets of up to 1000 samples (torch-fidelity's default is 100 subsets; its cubic
# kernel in numpy costs ~0.06 s a subset of 1000 on one core, measured, and a run has many cells)
KID_SUBSETS, KID_SUBSET_SIZE, PR_NEIGHBORHOOD = 10, 1000, 3
PR_BLOCK = 1 << 22  # elements of one block of pairwise distances (16 MB in float32)
KERNEL_BLOCK = 1 << 22  # elements of one block of kernel values in the KID replicates (float64)
PR_NEAREST = 32  # neighbours kept per sample for the replicates' k-NN radii


def _dc():
    """bench.metrics.digits_classifier, which imports (and registers itself with) torch-fidelity."""
    from . import digits_classifier

    return digits_classifier


def _mc():
    """bench.metrics.mnist_classifier, which imports (and registers itself with) torch-fidelity."""
    from . import mnist_classifier

    return mnist_classifier


def _url_inception() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


# --- Feature spaces -------------------------------------------------------------------


@dataclass
class FeatureSpace:
    """A torch-fidelity feature extractor, its reference statistics and report names.

    `key` suffixes value names (fid_digits); `title` goes into report titles
    ("FID (digits)"). `reference` holds mu and sigma (float64) and, where KID or
    precision/recall need them, the reference `features`.
    """

    key: str
    title: str
    extractor: FeatureExtractorBase
    reference: dict[str, Any]
    device: torch.device
    rgb: bool = False
    chunk: int = 1024

    @torch.no_grad()
    def features(self, x0: Tensor) -> Tensor:
        """Features [B, D] (float32, CPU) of samples in [-1, 1], extracted chunk by chunk."""
        images = _dc().to_uint8(x0)
        if self.rgb and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = [self.extractor(c.to(self.device))[0].float().cpu() for c in images.split(self.chunk)]
        return torch.cat(out)


def moments(features: Tensor) -> dict[str, np.ndarray]:
    """mu and sigma (float64) of a feature matrix, by the same streaming sums as the samples."""
    acc = _Moments()
    acc.update(features)
    return acc.stats()


def _cached(ctx: MetricContext, key: tuple, build: Callable[[], Any]) -> Any:
    """`build()` once per run: extractors and references are shared by every cell."""
    key = ("fidelity", *key)
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


def classifier_space(ctx: MetricContext, module, key: str, title: str) -> FeatureSpace:
    """A shipped classifier's features (`module`: NAME, FEATURES, reference_features())
    against its shipped reference features."""

    def build() -> FeatureSpace:
        from torch_fidelity.utils import create_feature_extractor

        extractor = create_feature_extractor(module.NAME, [module.FEATURES], cuda=False, verbose=False)
        features = module.reference_features()
        reference = {**moments(features), "features": features}
        return FeatureSpace(key, title, extractor.to(ctx.device), reference, ctx.device)

    return _cached(ctx, (key,), build)


def digits_space(ctx: MetricContext) -> FeatureSpace:
    """digits-classifier-v1 features against all 1797 digits (shipped reference features)."""
    return classifier_space(ctx, _dc(), "digits", "digits")


def mnist_space(ctx: MetricContext) -> FeatureSpace:
    """mnist-classifier-v1 features against MNIST's 10,000 test images (shipped reference features)."""
    return classifier_space(ctx, _mc(), "mnist", "MNIST")


def inception_space(ctx: MetricContext) -> FeatureSpace:
    """Inception-v3 pool3 features against the reference named by --ref-stats."""
    channels = ctx.denoiser.shape[0]
    if channels not in (1, 3):
        raise UsageError(
            f"metric 'fid-inception' needs grey or RGB images; model '{ctx.model}' has {channels} channels"
        )
    ref = ctx.options.get("ref_stats")
    if not ref:
        raise UsageError(
            "metric 'fid-inception' needs a reference: pass --ref-stats with an EDM-style .npz of mu/sigma, "
            "an image folder, or a torch-fidelity dataset name such as cifar10-train"
        )
    weights = ctx.options.get("fid_weights")

    def extractor() -> FeatureExtractorBase:
        return _cached(ctx, ("inception", weights), lambda: inception_extractor(weights, ctx.device))

    reference = _cached(
        ctx, ("inception-ref", weights, ref), lambda: inception_reference(ref, extractor, weights)
    )
    return FeatureSpace("inception", "Inception-v3", extractor(), reference, ctx.device, rgb=True, chunk=64)


# --- Inception weights and references -------------------------------------------------------


def inception_weights(path: str | None) -> Path:
    """`--fid-weights PATH`, else torch-fidelity's cached download (fetched when online)."""
    url = _url_inception()
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelLoadError(
                f"--fid-weights: '{file}' does not exist; give torch-fidelity's Inception weights "
                f"({INCEPTION_FILE}, from {url})"
            )
        return file
    dest = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    try:
        return fetch(url, dest, f"Inception-v3 weights {INCEPTION_FILE}")
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}, or pass --fid-weights PATH") from None


def inception_extractor(path: str | None, device: torch.device) -> FeatureExtractorBase:
    """torch-fidelity's inception-v3-compat on `device`, its weights checked before use."""
    from torch_fidelity.utils import create_feature_extractor

    file = inception_weights(path)
    use = f"use {INCEPTION_FILE} from {_url_inception()}"
    # Tensors only (no code runs), so a bad file is refused before torch-fidelity opens it
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"'{file}' is not a torch state dict of tensors ({type(exc).__name__}); {use}"
        ) from None
    missing = [k for k in INCEPTION_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ModelLoadError(f"'{file}' is not an Inception-v3 state dict (no '{missing[0]}'); {use}")
    try:
        extractor = create_feature_extractor(
            INCEPTION, [INCEPTION_LAYER], cuda=False, verbose=False, feature_extractor_weights_path=str(file)
        )
    except Exception as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))[:90]
        raise ModelLoadError(
            f"'{file}' does not fit torch-fidelity's Inception-v3 ({type(exc).__name__}: {detail}); {use}"
        ) from None
    return extractor.to(device)


def inception_reference(
    ref: str, extractor: Callable[[], FeatureExtractorBase], weights: str | None
) -> dict[str, Any]:
    """mu and sigma (float64) from an .npz, an image folder or a torch-fidelity dataset.

    `extractor()` gives the network, loaded only when the reference needs it.
    """
    from torch_fidelity.registry import DATASETS_REGISTRY

    dc = _dc()  # registers the digits as torch-fidelity's dataset sklearn-digits
    path = Path(ref).expanduser()
    if ref.endswith(".npz"):
        stats = _npz_stats(path)
    elif path.is_dir():
        stats = _torch_fidelity_stats(str(path), extractor(), cache=False)
    elif ref in DATASETS_REGISTRY:
        # torch-fidelity caches dataset statistics by name, valid for its own weights only
        try:
            download = not offline()
            stats = _torch_fidelity_stats(ref, extractor(), cache=weights is None, datasets_download=download)
        except (OSError, RuntimeError) as exc:
            root = Path(torch.hub._get_torch_home()) / "fidelity_datasets"
            raise ModelLoadError(
                f"reference dataset '{ref}' is not in {root} and cannot be downloaded "
                f"({type(exc).__name__}: {str(exc).strip()[:80]}); pass --ref-stats an .npz of mu/sigma "
                f"or an image folder instead"
            ) from None
    else:
        known = ", ".join(k for k in DATASETS_REGISTRY if k != dc.DATASET)
        raise UsageError(
            f"--ref-stats '{ref}' is neither an .npz of mu/sigma, an image folder, nor a torch-fidelity "
            f"dataset ({known})"
        )
    return {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma")}


def _npz_stats(path: Path) -> dict[str, np.ndarray]:
    """An EDM-style reference file: np.savez(path, mu=mu, sigma=sigma) of pool3 features."""
    if not path.is_file():
        raise UsageError(f"--ref-stats: '{path}' does not exist; give an .npz of mu and sigma")
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: np.asarray(data[k], dtype=np.float64) for k in ("mu", "sigma") if k in data}
            files = sorted(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"--ref-stats: '{path}' is not a plain .npz of numbers ({type(exc).__name__}); "
                         "give np.savez(path, mu=mu, sigma=sigma)") from None
    if len(stats) < 2:
        raise UsageError(f"--ref-stats: '{path}' holds {files}, not mu and sigma")
    if stats["mu"].shape != (INCEPTION_DIM,) or stats["sigma"].shape != (INCEPTION_DIM, INCEPTION_DIM):
        raise UsageError(
            f"--ref-stats: '{path}' has mu {stats['mu'].shape} and sigma {stats['sigma'].shape}; "
            f"Inception pool3 statistics are ({INCEPTION_DIM},) and ({INCEPTION_DIM}, {INCEPTION_DIM})"
        )
    return stats


def _torch_fidelity_stats(source: str, extractor: FeatureExtractorBase, **kwargs) -> dict[str, np.ndarray]:
    """torch-fidelity's own statistics of a folder or registered dataset, in-process."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached

    cuda = next(extractor.parameters()).device.type == "cuda"
    return fid_input_id_to_statistics_cached(
        1,
        extractor,
        INCEPTION_LAYER,
        input1=source,
        cuda=cuda,
        batch_size=64,
        save_cpu_ram=True,
        verbose=False,
        **kwargs,
    )


# --- Streaming metric states ---------------------------------------------------------------


def _need(ctx: MetricContext, name: str, minimum: int) -> None:
    """A UsageError before sampling when the run has too few samples for the metric."""
    if ctx.num_samples < minimum:
        raise UsageError(f"metric '{name}' needs at least {minimum} samples; raise --num-samples")


class _Features(Bootstrapped):
    """Keeps the features of every sample (never the images), in arrival order, for the
    whole-set metrics and the bootstrap (position i of an index row is the i-th sample)."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace]) -> None:
        self.space = space(ctx)
        self.parts: list[Tensor] = []
        self.bootstrap_b = bootstrap_b(ctx.options)

    def update(self, batch: Batch) -> None:
        self.parts.append(self.space.features(batch.x0))

    def _count(self) -> int:
        return sum(len(p) for p in self.parts)

    def both(self) -> tuple[Tensor, Tensor]:
        """(sample features, reference features)."""
        return torch.cat(self.parts), self.space.reference["features"]


class Frechet(_Features):
    """FID: running mean and covariance of the sample features; torch-fidelity's distance.

    `std`: the bootstrap standard error (`frechet_replicates`), the reference fixed.
    """

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, 2)
        super().__init__(ctx, space)
        self.samples = _Moments()

    def update(self, batch: Batch) -> None:
        features = self.space.features(batch.x0)
        self.samples.update(features)
        self.parts.append(features)

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        ref = self.space.reference  # also the cache of sqrt(S_ref), shared by every cell
        fid = frechet_replicates(
            torch.cat(self.parts), ref["mu"], ref["sigma"], index_sets, device=self.space.device, cache=ref
        )
        return {f"fid_{self.space.key}": fid}

    def result(self) -> Mapping[str, Value]:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        ref = {k: self.space.reference[k] for k in ("mu", "sigma")}
        fid = fid_statistics_to_metric(self.samples.stats(), ref, verbose=False)[KEY_METRIC_FID]
        key = f"fid_{self.space.key}"
        std = self.bootstrap_std().get(key)
        return {key: Value(fid, std=std, n=self.samples.n, title=f"FID ({self.space.title})")}


def _poly_kernel() -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """torch-fidelity's KID kernel with its defaults, k(x, y) = (x . y gamma + coef0) ** degree
    (gamma = 1 / d unless set), and its diagonal k(x_i, x_i)."""
    from torch_fidelity.defaults import DEFAULTS

    degree, gamma, coef0 = (DEFAULTS[f"kid_kernel_poly_{k}"] for k in ("degree", "gamma", "coef0"))

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T * (gamma or 1.0 / x.shape[1]) + coef0) ** degree

    def diagonal(x: Tensor) -> Tensor:
        return ((x * x).sum(1) * (gamma or 1.0 / x.shape[1]) + coef0) ** degree

    return kernel, diagonal


def kid_subsets(n: int, n_ref: int, subsets: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (sample, reference) positions of torch-fidelity's KID subsets: its draws from
    RandomState(rng_seed) in its order, so the subsets of `kid_features_to_metric`."""
    from torch_fidelity.defaults import DEFAULTS

    rng = np.random.RandomState(DEFAULTS["rng_seed"])
    return [
        (rng.choice(n, size, replace=False), rng.choice(n_ref, size, replace=False)) for _ in range(subsets)
    ]


@torch.no_grad()
def kid_replicates(
    gen: Tensor,
    ref: Tensor,
    index_sets: np.ndarray,
    subsets: int = KID_SUBSETS,
    size: int = KID_SUBSET_SIZE,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """KID of resampled samples, one a row of `index_sets`: float64 [B].

    torch-fidelity's estimate is the mean over `subsets` subsets of the unbiased MMD^2
    with the cubic kernel. Replicate b takes the same subset positions p_s of the row's
    draws (sources r[p_s]) and the same reference subsets q_s. With counts v of the
    sources, the sample term is sum_{i != j} v_i v_j k_ij / (m^2 - sum v_i^2): pairs of
    identical sources excluded (their k(x, x) is the diagonal the unbiased estimator
    drops; kept, they would bias every replicate up); for the identity row it is
    torch-fidelity's term. Float64; the n x n kernel is formed in column blocks.
    """
    device = torch.device(device) if device is not None else gen.device
    kernel, diagonal = _poly_kernel()
    g = gen.detach().to(device, torch.float64)
    y = ref.detach().to(device, torch.float64)
    n, m = len(g), min(size, len(g), len(y))
    draws = kid_subsets(n, len(y), subsets, m)
    w = counts(index_sets, n)
    B = len(w)
    # Reference terms, and the sums of k(sample i, reference subset s) as a matrix [n, S]
    ref_term = []
    pick = torch.zeros(len(y), subsets, dtype=torch.float64, device=device)
    for s, (_, q) in enumerate(draws):
        k = kernel(y[q], y[q])
        ref_term.append(float((k.sum() - k.diagonal().sum()) / (m * (m - 1))))
        pick[torch.as_tensor(q, device=device), s] = 1.0
    rows = max(1, KERNEL_BLOCK // max(1, len(y)))
    cross = torch.cat([kernel(g[lo : lo + rows], y) @ pick for lo in range(0, n, rows)])
    # Source counts per subset and replicate: all subsets are every sample when m == n
    if m == n:
        v = torch.from_numpy(w).to(device)
        per = [v] * subsets
    else:
        v = torch.from_numpy(np.concatenate([counts(index_sets[:, p], n) for p, _ in draws])).to(device)
        per = list(v.split(B))
    # diag(V K V^T) in column blocks of K
    quad = torch.zeros(len(v), dtype=torch.float64, device=device)
    cols = max(1, KERNEL_BLOCK // n)
    for lo in range(0, n, cols):
        k = kernel(g, g[lo : lo + cols])
        quad += ((v @ k) * v[:, lo : lo + cols]).sum(1)
    diag = diagonal(g)
    quad = quad.split(B) if m != n else [quad] * subsets
    mmd = torch.zeros(B, dtype=torch.float64, device=device)
    for s in range(subsets):
        vs = per[s]
        sq = vs.pow(2)
        sample_term = (quad[s] - sq @ diag) / (m * m - sq.sum(1))
        mmd += sample_term + ref_term[s] - 2 * (vs @ cross[:, s]) / (m * m)
    return (mmd / subsets).cpu().numpy()


class Kernel(_Features):
    """KID: torch-fidelity's unbiased MMD^2 (cubic polynomial kernel), mean over subsets;
    `std` the bootstrap standard error of that mean (`kid_replicates`)."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, 2)
        super().__init__(ctx, space)

    def _size(self, n: int) -> int:
        return min(KID_SUBSET_SIZE, n, len(self.space.reference["features"]))

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        gen, ref = self.both()
        kid = kid_replicates(gen, ref, index_sets, KID_SUBSETS, self._size(len(gen)), self.space.device)
        return {f"kid_{self.space.key}": kid}

    def result(self) -> Mapping[str, Value]:
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

        gen, ref = self.both()
        # float64 features: the kernel sums then match the replicates' to rounding
        size = self._size(len(gen))
        kid = kid_features_to_metric(
            gen.double(), ref.double(), kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False
        )
        key, title = f"kid_{self.space.key}", f"KID ({self.space.title})"
        std = self.bootstrap_std().get(key)
        return {key: Value(kid[KEY_METRIC_KID_MEAN], std=std, n=len(gen), title=title)}


def _cdist(a: Tensor, b: Tensor, block: int) -> Tensor:
    """Pairwise distances [len(a), len(b)] by torch.cdist on the same blocks as
    torch-fidelity's `calc_cdist_part` (rows and columns split by `block`), so every
    entry is the very number its precision/recall compares."""
    return torch.cat([torch.cat([torch.cdist(x, y) for y in b.split(block)], dim=1) for x in a.split(block)])


def _kth_radii(x: Tensor, k: int, block: int) -> Tensor:
    """torch-fidelity's k-NN radii: the (k+1)-th smallest distance of each row to all of x
    (itself included, at distance 0)."""
    return torch.cat([_cdist(part, x, block).kthvalue(k + 1).values for part in x.split(block)])


def _nearest(x: Tensor, k: int, keep: int, block: int) -> tuple[Tensor, Tensor]:
    """Each sample's `keep` nearest other samples (itself removed by index): distances and
    indices [n, keep], ascending, from the same distances as `_kth_radii`."""
    n = len(x)
    keep = min(keep, n - 1)
    dist, index = [], []
    for lo in range(0, n, block):
        d, i = _cdist(x[lo : lo + block], x, block).topk(keep + 1, dim=1, largest=False, sorted=True)
        own = i == torch.arange(lo, lo + len(i), device=i.device)[:, None]
        own[~own.any(1), -1] = True  # itself beyond the kept ones (exact duplicates): drop the last
        dist.append(d[~own].reshape(len(i), keep))
        index.append(i[~own].reshape(len(i), keep))
    return torch.cat(dist), torch.cat(index)


@torch.no_grad()
def prc_replicates(
    gen: Tensor,
    ref: Tensor,
    index_sets: np.ndarray,
    k: int = PR_NEIGHBORHOOD,
    device: torch.device | str | None = None,
    cache: dict | None = None,
) -> dict[str, np.ndarray]:
    """Improved precision and recall of resampled samples, one a row of `index_sets`:
    {"precision", "recall"}: float64 [B] each.

    Precision is the mean over samples of "inside some reference point's k-NN ball" (the
    reference fixed), so a replicate is the count-weighted mean of those indicators.
    Recall is the share of reference points inside some drawn sample's ball, whose
    radius is the distance to its k-th nearest draw in the resampled multiset: draws of
    other samples count with their multiplicity, a sample's own copies not at all (they
    would give every repeated sample a radius of 0). For the identity row both are
    torch-fidelity's values (the distances are computed as it computes them). The k-th
    draw is searched among each sample's PR_NEAREST nearest neighbours, and among all
    samples for the rare rows where those hold fewer than k draws. `cache` (a dict kept
    with the reference) holds the reference's radii between calls.
    """
    device = torch.device(device) if device is not None else gen.device
    g = gen.detach().to(device, torch.float64)
    y = ref.detach().to(device, torch.float64)
    n = len(g)
    block = max(1, PR_BLOCK // max(n, len(y)))
    w = torch.from_numpy(counts(index_sets, n)).to(device)
    # Precision: fixed indicators
    key = ("prc_radii", k, block, str(device))
    ref_radii = cache.get(key) if cache is not None else None
    if ref_radii is None:
        ref_radii = _kth_radii(y, k, block)
        if cache is not None:
            cache[key] = ref_radii
    inside = torch.cat([(_cdist(part, y, block) <= ref_radii).any(1) for part in g.split(block)])
    precision = w @ inside.double() / n
    # Recall: radii of the drawn samples in each replicate's multiset
    near_d, near_i = _nearest(g, k, PR_NEAREST, block)
    radii = torch.empty_like(w)
    step = max(1, PR_BLOCK // (n * near_i.shape[1]))
    for lo in range(0, len(w), step):
        reach = w[lo : lo + step][:, near_i].cumsum(-1)  # [b, n, keep]: draws within each distance
        found = reach[..., -1] >= k
        first = (reach >= k).double().argmax(-1, keepdim=True)
        at = near_d.expand(len(reach), -1, -1).gather(-1, first)[..., 0]
        radii[lo : lo + step] = torch.where(found, at, -1.0)
    for b, i in (radii < 0).logical_and(w > 0).nonzero().tolist():
        d = _cdist(g[i : i + 1], g, block)[0]
        d[i] = float("inf")
        order = d.argsort()
        reach = w[b, order].cumsum(0)
        hit = (reach >= k).nonzero()
        # fewer than k other draws in all (tiny n): the farthest of them
        drawn = (w[b, order] > 0).logical_and(order != i).nonzero()
        radii[b, i] = d[order[hit[0, 0]]] if len(hit) else d[order[drawn[-1, 0]]]
    radii = torch.where(w > 0, radii, -torch.inf)  # samples not drawn cover nothing
    # Only (reference j, sample i) pairs within i's largest radius over the replicates can count
    between = _cdist(y, g, block)  # [N, n]
    ref_j, gen_i = (between <= radii.max(0).values).nonzero(as_tuple=True)
    dist = between[ref_j, gen_i]
    del between
    recall = torch.empty(len(w), dtype=torch.float64, device=device)
    step = max(1, PR_BLOCK // max(1, len(dist), len(y)))
    for lo in range(0, len(w), step):
        inside = (dist <= radii[lo : lo + step][:, gen_i]).double()
        covered = torch.zeros(len(inside), len(y), dtype=torch.float64, device=device)
        covered.scatter_reduce_(1, ref_j.expand(len(inside), -1), inside, "amax")
        recall[lo : lo + step] = covered.mean(1)
    return {"precision": precision.cpu().numpy(), "recall": recall.cpu().numpy()}


class PrecisionRecall(_Features):
    """Improved precision and recall with k = 3 nearest neighbours, by torch-fidelity;
    `std` the bootstrap standard errors (`prc_replicates`)."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, PR_NEIGHBORHOOD + 1)
        super().__init__(ctx, space)

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        gen, ref = self.both()
        space = self.space
        reps = prc_replicates(gen, ref, index_sets, PR_NEIGHBORHOOD, space.device, space.reference)
        return {f"{k}_{self.space.key}": v for k, v in reps.items()}

    def result(self) -> Mapping[str, Value]:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        gen, ref = self.both()
        # Blocks of pairwise distances stay under PR_BLOCK elements whatever the sample count;
        # float64, as the replicates compute them
        block = max(1, PR_BLOCK // max(len(gen), len(ref)))
        prc = prc_features_to_metric(
            gen.double(),
            ref.double(),
            prc_neighborhood=PR_NEIGHBORHOOD,
            prc_batch_size=block,
            save_cpu_ram=True,
            verbose=False,
        )
        key, title, n = self.space.key, self.space.title, len(gen)
        std = self.bootstrap_std()
        return {f"{what}_{key}": Value(prc[which], higher_is_better=True, std=std.get(f"{what}_{key}"), n=n,
                                       title=f"{what} ({title})")
                for what, which in (("precision", KEY_METRIC_PRECISION), ("recall", KEY_METRIC_RECALL))}


def _fits(ctx: MetricContext, name: str, side: int) -> str | None:
    """Why classifier `name` cannot take the model's images (grey or RGB, square, side a
    multiple of `side`)."""
    c, h, w = image_shape(ctx.denoiser)
    if c in (1, 3) and h == w and h % side == 0:
        return None
    return (f"{name} takes grey or RGB square images of side {side}k, the model's are {c}x{h}x{w}; "
            "use --metrics reference (any model)")


def digits_fits(ctx: MetricContext) -> str | None:
    """Why digits-classifier-v1 cannot take the model's images (grey or RGB, square, side 8k)."""
    return _fits(ctx, "digits-classifier-v1", 8)


def mnist_fits(ctx: MetricContext) -> str | None:
    """Why mnist-classifier-v1 cannot take the model's images (grey or RGB, square, side 28k)."""
    return _fits(ctx, "mnist-classifier-v1", 28)


def inception_fits(ctx: MetricContext) -> str | None:
    """Why fid-inception cannot run: not grey or RGB, no --ref-stats, no weights here, or a
    reference it cannot read. Builds the run's extractor and reference (cached for its cells);
    weights that are there but broken stay a ModelLoadError."""
    c = image_shape(ctx.denoiser)[0]
    if c not in (1, 3):
        return f"Inception-v3 takes grey or RGB images, the model's have {c} channels"
    if not ctx.options.get("ref_stats"):
        return ("it needs a reference: pass --ref-stats with an EDM-style .npz of mu/sigma, an image folder, "
                "or a torch-fidelity dataset name such as cifar10-train")
    try:
        inception_weights(ctx.options.get("fid_weights"))  # the file given, cached or fetched now
    except ModelLoadError as exc:
        return str(exc)
    try:
        inception_space(ctx)
    except UsageError as exc:
        return str(exc)
    return None


def _applies(ctx: MetricContext, *, minimum: int, fits: Callable[[MetricContext], str | None]) -> str | None:
    """Too few samples for the metric, or images its feature space does not take."""
    if ctx.num_samples < minimum:
        return f"it needs at least {minimum} samples; raise --num-samples"
    return fits(ctx)


def _metric(name: str, state: type, space: Callable[[MetricContext], FeatureSpace], what: str,
            fits: Callable[[MetricContext], str | None] = digits_fits, data: Callable | None = None,
            default_for: tuple = (), **options: Any) -> Metric:
    minimum = PR_NEIGHBORHOOD + 1 if state is PrecisionRecall else 2
    return Metric(name, partial(state, space=space, name=name), what, floor=True,
                  applies=partial(_applies, minimum=minimum, fits=fits), options=options,
                  data_samples=data, default_for=default_for, answers="closest to the data")


MNIST = (1, 28, 28)  # the image shape whose models get fid-mnist and kid-mnist by default


METRICS = [
    _metric(
        "fid-digits",
        Frechet,
        digits_space,
        "FID (digits): digits-classifier-v1 features vs all 1797 digits (torch-fidelity)",
    ),
    _metric(
        "kid-digits",
        Kernel,
        digits_space,
        f"KID (digits): mean ± std over {KID_SUBSETS} subsets of up to {KID_SUBSET_SIZE} (torch-fidelity)",
    ),
    _metric(
        "pr-digits", PrecisionRecall, digits_space, "precision and recall (digits), k=3 (torch-fidelity)"
    ),
    _metric(
        "fid-mnist",
        Frechet,
        mnist_space,
        "FID (MNIST): mnist-classifier-v1 features vs MNIST's 10,000 test images (torch-fidelity); "
        "default for 1x28x28 models",
        mnist_fits,
        mnist_samples,
        (MNIST,),
    ),
    _metric(
        "kid-mnist",
        Kernel,
        mnist_space,
        f"KID (MNIST): mean ± std over {KID_SUBSETS} subsets of up to {KID_SUBSET_SIZE} (torch-fidelity); "
        "default for 1x28x28 models",
        mnist_fits,
        mnist_samples,
        (MNIST,),
    ),
    _metric(
        "pr-mnist",
        PrecisionRecall,
        mnist_space,
        "precision and recall (MNIST), k=3 (torch-fidelity)",
        mnist_fits,
        mnist_samples,
    ),
    _metric(
        "fid-inception",
        Frechet,
        inception_space,
        "FID (Inception-v3 pool3, torch-fidelity); --fid-weights PATH, --ref-stats NPZ|DIR|DATASET",
        inception_fits,
        fid_weights=None,
        ref_stats=None,
    ),
]
