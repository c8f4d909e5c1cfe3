"""Feature-space metrics computed by torch-fidelity's own functions, fed batch by batch.

FID (Heusel et al. 2017), KID (Binkowski et al. 2018) and improved precision/recall
(Kynkäänniemi et al. 2019) compare the samples' features with a reference set's:

- `fid-digits`, `kid-digits`, `pr-digits`: features of `digits-classifier-v1` (see
  `bench.digits_classifier`) against all 1797 scikit-learn digits, shipped in bench/assets.
- `fid-inception`: pool3 features (2048-d) of torch-fidelity's `inception-v3-compat`
  (the TF-Inception port EDM's protocol uses); weights from torch-fidelity's cache or
  `--fid-weights PATH`; reference from `--ref-stats`: an EDM-style .npz of mu/sigma, an
  image folder, or a torch-fidelity dataset name such as cifar10-train.

Streaming: samples arrive in [-1, 1] and are quantised to uint8 as EDM saves them
(x * 127.5 + 128, clipped), then reduced to features at once. FID keeps the running
mean and covariance of the features (float64) and hands them to
`fid_statistics_to_metric`; KID (`kid_features_to_metric`) and precision/recall
(`prc_features_to_metric`, distance blocks capped in size) keep the features only, 64
floats a sample. Every value carries its sample count; KID its std over subsets. FID has
no spread here: FID over blocks of a run would be FID at a smaller n, biased differently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_input_id_to_statistics_cached,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import DATASETS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from . import digits_classifier as dc
from .contracts import Batch, Metric, MetricContext, Value
from .errors import ModelLoadError, UsageError
from .metrics import _Moments
from .sources.download import fetch, offline

INCEPTION, INCEPTION_LAYER, INCEPTION_DIM = "inception-v3-compat", "2048", 2048
INCEPTION_FILE = Path(URL_INCEPTION_V3).name
INCEPTION_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")
# KID: 10 subsets of up to 1000 samples (torch-fidelity's default is 100 subsets; its cubic
# kernel in numpy costs ~0.06 s a subset of 1000 on one core, measured, and a run has many cells)
KID_SUBSETS, KID_SUBSET_SIZE, PR_NEIGHBORHOOD = 10, 1000, 3
PR_BLOCK = 1 << 22  # elements of one block of pairwise distances (16 MB in float32)


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
        images = dc.to_uint8(x0)
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


def digits_space(ctx: MetricContext) -> FeatureSpace:
    """digits-classifier-v1 features against all 1797 digits (shipped reference features)."""

    def build() -> FeatureSpace:
        extractor = create_feature_extractor(dc.NAME, [dc.FEATURES], cuda=False, verbose=False)
        features = dc.reference_features()
        reference = {**moments(features), "features": features}
        return FeatureSpace("digits", "digits", extractor.to(ctx.device), reference, ctx.device)

    return _cached(ctx, ("digits",), build)


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
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ModelLoadError(
                f"--fid-weights: '{file}' does not exist; give torch-fidelity's Inception weights "
                f"({INCEPTION_FILE}, from {URL_INCEPTION_V3})"
            )
        return file
    dest = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    try:
        return fetch(URL_INCEPTION_V3, dest, f"Inception-v3 weights {INCEPTION_FILE}")
    except ModelLoadError as exc:
        raise ModelLoadError(f"{exc}, or pass --fid-weights PATH") from None


def inception_extractor(path: str | None, device: torch.device) -> FeatureExtractorBase:
    """torch-fidelity's inception-v3-compat on `device`, its weights checked before use."""
    file = inception_weights(path)
    use = f"use {INCEPTION_FILE} from {URL_INCEPTION_V3}"
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
    with np.load(path) as data:
        stats = {k: data[k] for k in ("mu", "sigma") if k in data}
        files = sorted(data.files)
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


class Frechet:
    """FID: running mean and covariance of the sample features; torch-fidelity's distance."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, 2)
        self.space = space(ctx)
        self.samples = _Moments()

    def update(self, batch: Batch) -> None:
        self.samples.update(self.space.features(batch.x0))

    def result(self) -> Mapping[str, Value]:
        ref = {k: self.space.reference[k] for k in ("mu", "sigma")}
        fid = fid_statistics_to_metric(self.samples.stats(), ref, verbose=False)[KEY_METRIC_FID]
        return {f"fid_{self.space.key}": Value(fid, n=self.samples.n, title=f"FID ({self.space.title})")}


class _Features:
    """Keeps the features of every sample (never the images) for a whole-set metric."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace]) -> None:
        self.space = space(ctx)
        self.parts: list[Tensor] = []

    def update(self, batch: Batch) -> None:
        self.parts.append(self.space.features(batch.x0))

    def both(self) -> tuple[Tensor, Tensor]:
        """(sample features, reference features)."""
        return torch.cat(self.parts), self.space.reference["features"]


class Kernel(_Features):
    """KID: torch-fidelity's unbiased MMD^2 (cubic polynomial kernel), mean ± std over subsets."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, 2)
        super().__init__(ctx, space)

    def result(self) -> Mapping[str, Value]:
        gen, ref = self.both()
        size = min(KID_SUBSET_SIZE, len(gen), len(ref))
        kid = kid_features_to_metric(gen, ref, kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False)
        mean, std = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
        title = f"KID ({self.space.title})"
        return {f"kid_{self.space.key}": Value(mean, std=std, n=len(gen), title=title)}


class PrecisionRecall(_Features):
    """Improved precision and recall with k = 3 nearest neighbours, by torch-fidelity."""

    def __init__(self, ctx: MetricContext, space: Callable[[MetricContext], FeatureSpace], name: str) -> None:
        _need(ctx, name, PR_NEIGHBORHOOD + 1)
        super().__init__(ctx, space)

    def result(self) -> Mapping[str, Value]:
        gen, ref = self.both()
        # Blocks of pairwise distances stay under PR_BLOCK elements whatever the sample count
        block = max(1, PR_BLOCK // max(len(gen), len(ref)))
        prc = prc_features_to_metric(
            gen, ref, prc_neighborhood=PR_NEIGHBORHOOD, prc_batch_size=block, save_cpu_ram=True, verbose=False
        )
        key, title, n = self.space.key, self.space.title, len(gen)
        return {
            f"precision_{key}": Value(
                prc[KEY_METRIC_PRECISION], higher_is_better=True, n=n, title=f"precision ({title})"
            ),
            f"recall_{key}": Value(
                prc[KEY_METRIC_RECALL], higher_is_better=True, n=n, title=f"recall ({title})"
            ),
        }


def _metric(name: str, state: type, space: Callable[[MetricContext], FeatureSpace], what: str) -> Metric:
    return Metric(name, partial(state, space=space, name=name), what)


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
        "fid-inception",
        Frechet,
        inception_space,
        "FID (Inception-v3 pool3, torch-fidelity); --fid-weights PATH, --ref-stats NPZ|DIR|DATASET",
    ),
]
