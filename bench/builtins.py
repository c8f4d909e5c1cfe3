"""The host's own plugin: analytic models, built-in metrics and reporters.

Registered through the `bench` entry point exactly like a third-party plugin.
"""

from __future__ import annotations

from . import hookimpl
from .contracts import ModelSource
from .digits import SOURCES as DIGITS_SOURCES
from .digits import add_train_command
from .fidelity import METRICS as FEATURE_METRICS
from .loaders import SOURCES as CHECKPOINT_SOURCES
from .metrics import METRICS
from .models import gaussian, mixture, parse_shape
from .reports import REPORTERS
from .throughput import SOURCES as THROUGHPUT_SOURCES


def _load_mixture(arg, device=None, **_):
    return mixture(shape=parse_shape(arg))


def _load_gaussian(arg, device=None, **_):
    return gaussian(shape=parse_shape(arg))


@hookimpl
def register_models(register):
    register(ModelSource(
        "mixture",
        _load_mixture,
        "analytic 8-component Gaussian mixture, exact denoiser (mixture[:CxHxW], default 1x8x8)",
        default_metrics=("fd", "rmse"),
    ))
    register(ModelSource(
        "gaussian",
        _load_gaussian,
        "analytic single Gaussian, closed-form ODE solution (gaussian[:CxHxW])",
        default_metrics=("fd", "rmse"),
    ))
    for source in [*CHECKPOINT_SOURCES, *THROUGHPUT_SOURCES]:
        register(source)
    for source in DIGITS_SOURCES:
        register(source)


@hookimpl
def register_metrics(register):
    for metric in [*METRICS, *FEATURE_METRICS]:
        register(metric)


@hookimpl
def register_commands(subparsers):
    add_train_command(subparsers)


@hookimpl
def register_reporters(register):
    for reporter in REPORTERS:
        register(reporter)
