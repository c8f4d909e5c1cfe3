"""The built-in metrics, one module each, and which of them score a model's cells:

    analytic.py    fd: Fréchet distance to an analytic model's exact data moments
    reference.py   reference: each sample's error to a converged solve of its own ODE
    fidelity.py    fid-*, kid-*, pr-*: torch-fidelity's metrics in a feature space
    classifier.py  what a classifier feature space needs; digits_classifier.py and
                   mnist_classifier.py the two the project trains and ships
    clip.py        clip: CLIP score of a text model's samples against their prompts

Every state has `replicates(index_sets)` (bench.stats): the metric recomputed on resampled
sample positions against the same fixed reference, so cells on the same noise pair.

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

import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ..contracts import Denoiser, Metric, MetricContext
from ..errors import UsageError


def metrics() -> list[Metric]:
    """Every built-in metric, in the order `bench list metrics` shows them."""
    from .analytic import METRICS as ANALYTIC
    from .clip import METRIC as CLIP
    from .fidelity import METRICS as FEATURE_METRICS
    from .reference import METRIC as REFERENCE

    return [*ANALYTIC, REFERENCE, *FEATURE_METRICS, CLIP]


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
