"""The built-in model sources, registered like a third party's (bench.builtins), one module
each:

    analytic.py   mixture, gaussian: exact denoisers of known distributions (no weights)
    digits.py     digits, digits-flow, digits-optimal: scikit-learn's 8x8 digits
    mnist.py      mnist, mnist-flow: MNIST's 28x28 digits
    random.py     throughput-ddpm-cifar10: a real architecture with random weights, for speed
    edm.py        edm:PATH|URL|PRESET[;class=K]: NVlabs network pickles (--trust-pickle)
    diffusers.py  diffusers:DIR|OWNER/REPO|PRESET[;...]: UNet2DModel and latent pipelines
    factory.py    factory:MODULE|FILE.py:FUNCTION[;weights=FILE][;key=value...]: your network
    arguments.py  a model spec's `target;key=value` argument; download.py the cache, downloads

Each checkpoint source is a complete ModelSource a third party can copy: resolve the
target, load the network, adapt it to the Denoiser contract (bench.adapters) and say in
one line what to do when something is missing. Nothing heavy is imported until a source
is asked for. The analytic models' names (`gaussian`, `mixture`, `GaussianMixture`) still
import from here, as from bench.models before 0.3.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

MODULES = ("analytic", "edm", "diffusers", "factory", "random", "digits", "mnist")


def sources() -> list[Any]:
    """Every built-in ModelSource, in the order `bench list models` shows them."""
    out: list[Any] = []
    for name in MODULES:
        module = import_module(f".{name}", __name__)
        out += list(getattr(module, "SOURCES", None) or [module.SOURCE])
    return out


def __getattr__(name: str) -> Any:
    if name == "SOURCES":
        return tuple(sources())
    analytic = import_module(".analytic", __name__)
    if hasattr(analytic, name):  # bench.models was the analytic models' module until 0.3
        return getattr(analytic, name)
    raise AttributeError(f"module 'bench.models' has no attribute '{name}'")
