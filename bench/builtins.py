"""The host's own plugin: analytic models, the digits models, checkpoint sources, built-in
metrics and reporters, classifier-free guidance (`cfg`) and `bench train-digits`.

Registered through the `bench` entry point exactly like a third-party plugin, and as
import-light as one should be: each hook imports what it registers.
"""

from __future__ import annotations

from pathlib import Path

from . import hookimpl
from .plugins import deferred


@hookimpl
def register_models(register):
    from .digits import SOURCES as DIGITS_SOURCES
    from .mnist import SOURCES as MNIST_SOURCES
    from .models import SOURCES as ANALYTIC_SOURCES
    from .sources import SOURCES as CHECKPOINT_SOURCES
    from .throughput import SOURCES as THROUGHPUT_SOURCES

    sources = [*ANALYTIC_SOURCES, *CHECKPOINT_SOURCES, *THROUGHPUT_SOURCES, *DIGITS_SOURCES, *MNIST_SOURCES]
    for source in sources:
        register(source)


@hookimpl
def register_modifiers(register):
    from .conditioning import MODIFIERS

    for modifier in MODIFIERS:
        register(modifier)


@hookimpl
def register_metrics(register):
    from .clip import METRIC as CLIP
    from .fidelity import METRICS as FEATURE_METRICS
    from .metrics import METRICS
    from .reference import METRIC as REFERENCE

    for metric in [*METRICS, REFERENCE, *FEATURE_METRICS, CLIP]:
        register(metric)


REPORTERS = (
    ("verdict", "render_verdict", "verdict.json: per budget the best method and those tied with it (paired)"),
    ("console", "render_console", "tables on the terminal (rich)"),
    ("csv", "render_csv", "results.csv: one row per cell, stable columns"),
    ("markdown", "render_markdown", "report.md: the tables, environment and problems"),
    ("html", "render_html", "report.html: tables, plots, sample grids, environment (self-contained)"),
)


def _deferred_render(name: str):
    """bench.reports.<name>, imported when a run is rendered (pandas and matplotlib are slow
    to import, and `bench list` needs neither)."""

    def render(run, console):
        from . import reports

        return getattr(reports, name)(run, console)

    return render


@hookimpl
def register_reporters(register):
    from .contracts import Reporter

    for name, function, description in REPORTERS:
        register(Reporter(name, _deferred_render(function), description))


def _training_command(subparsers, name: str, what: str, data: str, steps: int, lr: str, objective: str,
                      data_note: str = ""):
    """A `bench train-*` parser with the options both training commands share."""
    p = subparsers.add_parser(name, help=f"train the embedded {what} UNet (deterministic, CPU{data_note})")
    p.add_argument("--out", type=Path, default=Path(f"{what}-unet.safetensors"),
                   help=f"weights file to write (the shipped one is bench/assets/{what}-unet.safetensors)")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {lr})")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--limit", type=int, default=None, help=f"train on the first N {data} only")
    p.add_argument("--objective", default="edm", help=objective)
    p.add_argument("--quiet", action="store_true")
    return p


@hookimpl
def register_commands(subparsers):
    """`bench train-digits` and `bench train-mnist`: train an embedded UNet and write its
    weights (defaults: the recipes of bench.digits.TrainConfig and bench.mnist.TrainConfig,
    MODEL_CARD.md)."""
    p = _training_command(subparsers, "train-digits", "digits", "digits", 4000, "2e-3",
                          "edm (model digits) or flow: rectified flow, velocity (model digits-flow, "
                          "shipped as bench/assets/digits-flow-unet.safetensors)")
    p.add_argument("--channels", default=None, help="channels per level, the last the bottleneck's")
    p.set_defaults(func=deferred("bench.digits:cmd_train_digits"))

    p = _training_command(subparsers, "train-mnist", "mnist", "training images", 5000, "2e-3",
                          "edm (model mnist) or flow: rectified flow, velocity (model mnist-flow, "
                          "shipped as bench/assets/mnist-flow-unet.safetensors)",
                          "; reads the MNIST wheel, bench.data")
    p.add_argument("--channels", default=None, help="channels at 14x14 and 7x7 (default 32,64)")
    p.add_argument("--blocks", type=int, default=None, help="ResBlocks (each a skip) per level (default 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads at 7x7 (default 4; 0: none)")
    p.set_defaults(func=deferred("bench.mnist:cmd_train_mnist"))
