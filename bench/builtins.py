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
    from .models import SOURCES as ANALYTIC_SOURCES
    from .sources import SOURCES as CHECKPOINT_SOURCES
    from .throughput import SOURCES as THROUGHPUT_SOURCES

    for source in [*ANALYTIC_SOURCES, *CHECKPOINT_SOURCES, *THROUGHPUT_SOURCES, *DIGITS_SOURCES]:
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


@hookimpl
def register_commands(subparsers):
    """`bench train-digits`: train the digits UNet and write its weights (defaults: the
    recipe of bench.digits.TrainConfig, MODEL_CARD.md)."""
    p = subparsers.add_parser("train-digits", help="train the embedded digits UNet (deterministic, CPU)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("digits-unet.safetensors"),
        help="weights file to write (the shipped one is bench/assets/digits-unet.safetensors)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 4000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--limit", type=int, default=None, help="train on the first N digits only")
    p.add_argument("--channels", default=None, help="channels per level, the last the bottleneck's")
    p.add_argument("--objective", default="edm",
                   help="edm (model digits) or flow: rectified flow, velocity (model digits-flow, "
                        "shipped as bench/assets/digits-flow-unet.safetensors)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=deferred("bench.digits:cmd_train_digits"))
