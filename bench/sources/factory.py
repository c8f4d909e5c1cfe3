"""factory: a Python function that builds a network and declares its parameterization
(`Declared`), or returns a ready bench.Denoiser; weights from a safetensors file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters import PREDICTIONS, DiscreteVP, Preconditioned
from ..contracts import Denoiser, ModelSource, cast_like
from ..errors import ModelLoadError, UsageError
from . import PREDICTION_ALIASES, parse_arg
from .download import reason


@dataclass
class Declared:
    """What a `module:function` factory returns: a network and how to read it.

    kind: "edm" (F-prediction, EDM preconditioning), "vp" (continuous VP time axis
    (M - 1) t, prediction eps / v / x0), "ve" (D = x + sigma F, NCSN++) or "discrete"
    (DDPM integer timesteps with `alphas_cumprod`, prediction eps / v / x0). The network is
    called as net(x_in, c_noise, **cond), or net(x_vp, t, **cond) when discrete;
    `has_bottleneck` as in bench.adapters.Preconditioned (continuous kinds).
    """

    net: torch.nn.Module
    shape: tuple[int, int, int]
    kind: str = "edm"
    prediction: str = "epsilon"
    sigma_data: float = 0.5
    sigma_min: float | None = None
    sigma_max: float | None = None
    alphas_cumprod: Tensor | None = None
    has_bottleneck: bool = False


def import_factory(target: str) -> Callable[..., Any]:
    """`pkg.mod:fn` or `path/to/file.py:fn` -> the function."""
    module_name, sep, fn_name = target.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UsageError(f"factory '{target}' is not module:function (e.g. factory:mypkg.nets:build)")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(
                f"bench_factory_{Path(module_name).stem}", module_name
            )
            if spec is None or not Path(module_name).is_file():
                raise ModelLoadError(f"factory: no such file '{module_name}'")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look modules up there
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"factory: cannot import '{module_name}' ({exc})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"factory: '{module_name}' has no function '{fn_name}'")
    return fn


def load_weights(net: torch.nn.Module, path: str) -> None:
    """Load a safetensors state dict into `net`, every key matching."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelLoadError(f"factory: no such weights file '{path}'")
    try:
        result = net.load_state_dict(load_file(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"factory: weights {path} do not match the network: {reason(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"factory: weights {path} do not match the network: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def wrap_declared(declared: Declared) -> Denoiser:
    """The Denoiser for a declared network (bench.adapters)."""
    kind = declared.kind
    if kind not in ("edm", "vp", "ve", "discrete"):
        raise UsageError(f"factory: unknown kind '{kind}'; use edm, vp, ve or discrete")
    prediction = PREDICTION_ALIASES.get(declared.prediction, declared.prediction)
    if prediction not in PREDICTIONS:
        raise UsageError(f"factory: unknown prediction '{declared.prediction}'; use eps, v or x0")
    if kind == "discrete":
        if declared.alphas_cumprod is None:
            raise UsageError("factory: kind 'discrete' needs alphas_cumprod")
        return DiscreteVP(
            declared.net,
            declared.alphas_cumprod,
            declared.shape,
            prediction=prediction,
            net=declared.net,
            sigma_data=declared.sigma_data,
        )
    if kind in ("edm", "ve") and prediction != "epsilon":
        raise UsageError(f"factory: kind '{kind}' has its own output F; prediction is for vp and discrete")
    return Preconditioned(
        declared.net,
        kind,
        declared.shape,
        sigma_data=declared.sigma_data,
        prediction=prediction,
        sigma_min=declared.sigma_min,
        sigma_max=declared.sigma_max,
        has_bottleneck=declared.has_bottleneck,
    )


def load_factory(arg: str | None, device=None, **_: Any) -> Denoiser:
    """factory:MODULE:FUNCTION[;weights=FILE.safetensors][;key=value...] -- a Python factory."""
    target, given = parse_arg("factory", arg)
    weights = given.pop("weights", None)
    kwargs = {k: cast_like(None, v, f"factory option '{k}'") for k, v in given.items()}
    made = import_factory(target)(**kwargs)
    # A ready Denoiser, a Declared or a dict of Declared's fields
    if isinstance(made, Denoiser):
        if weights:
            load_weights(made, weights)
        return made
    if isinstance(made, Mapping):
        names = {f.name for f in fields(Declared)}
        if not {"net", "shape"} <= set(made) or set(made) - names:
            raise ModelLoadError(
                f"factory {target} returned a dict; its keys must be among "
                f"{sorted(names)}, with net and shape"
            )
        made = Declared(**made)
    if not isinstance(made, Declared):
        raise ModelLoadError(
            f"factory {target} returned {type(made).__name__}; return a "
            "bench.Denoiser, a bench.sources.factory.Declared or a dict of its fields"
        )
    if weights:
        load_weights(made.net, weights)
    return wrap_declared(made)


SOURCE = ModelSource(
        "factory",
        load_factory,
        "Python factory returning a network and its parameterization: "
        "factory:MODULE|FILE.py:FUNCTION[;weights=FILE.safetensors][;key=value]",
    )
