"""sampler-bench: benchmark diffusion samplers by quality, counted NFE and wall-clock."""

from importlib.metadata import PackageNotFoundError, version

import pluggy

from .contracts import (
    Batch,
    Denoiser,
    Metric,
    MetricContext,
    ModelSource,
    Modifier,
    Plan,
    Reporter,
    Sampler,
    Schedule,
    Value,
)

try:
    __version__ = version("sampler-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

hookimpl = pluggy.HookimplMarker("bench")

__all__ = [
    "Batch",
    "Denoiser",
    "Metric",
    "MetricContext",
    "Modifier",
    "ModelSource",
    "Plan",
    "Reporter",
    "Sampler",
    "Schedule",
    "Value",
    "hookimpl",
]
