"""The host's own plugin: analytic models, the digits models, checkpoint sources, built-in
metrics and reporters, classifier-free guidance (`cfg`) and `bench train-digits`.

Registered through the `bench` entry point exactly like a third-party plugin, and as
import-light as one should be: each hook imports what it registers.
"""

from __future__ import annotations

from pathlib import Path

from . import hookimpl
from .plugins import deferred, register_all

# Registered exactly as a third-party plugin registers (bench.register_all): each hook imports
# what it registers when it runs
register_models = register_all("bench.models:sources")
register_modifiers = register_all("bench.conditioning:MODIFIERS")
register_metrics = register_all("bench.metrics:metrics")
register_reporters = register_all("bench.reporters:REPORTERS")


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
    weights (defaults: the recipes of bench.models.digits and bench.models.mnist,
    MODEL_CARD.md)."""
    p = _training_command(subparsers, "train-digits", "digits", "digits", 4000, "2e-3",
                          "edm (model digits) or flow: rectified flow, velocity (model digits-flow, "
                          "shipped as bench/assets/digits-flow-unet.safetensors)")
    p.add_argument("--channels", default=None, help="channels per level, the last the bottleneck's")
    p.set_defaults(func=deferred("bench.models.digits:cmd_train_digits"))

    p = _training_command(subparsers, "train-mnist", "mnist", "training images", 5000, "2e-3",
                          "edm (model mnist) or flow: rectified flow, velocity (model mnist-flow, "
                          "shipped as bench/assets/mnist-flow-unet.safetensors)",
                          "; reads the MNIST wheel, bench.data")
    p.add_argument("--channels", default=None, help="channels at 14x14 and 7x7 (default 32,64)")
    p.add_argument("--blocks", type=int, default=None, help="ResBlocks (each a skip) per level (default 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads at 7x7 (default 4; 0: none)")
    p.set_defaults(func=deferred("bench.models.mnist:cmd_train_mnist"))
