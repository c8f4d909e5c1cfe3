"""factory: a Python function that builds a network and declares its parameterization
(`Declared`), or returns a ready bench.Denoiser; weights from a safetensors file or a torch
state dict (`.pt`, `.pth`, `.bin`, read with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters import FLOW_PREDICTIONS, PREDICTIONS, DiscreteVP, Flow, Preconditioned
from ..contracts import Denoiser, ModelSource, cast_like
from ..errors import ModelLoadError, UsageError
from .arguments import PREDICTION_ALIASES, parse_arg
from .download import reason


@dataclass
class Declared:
    """What a `module:function` factory returns: a network and how to read it.

    kind: "edm" (F-prediction, EDM preconditioning), "vp" (continuous VP time axis
    (M - 1) t, prediction eps / v / x0), "ve" (D = x + sigma F, NCSN++), "discrete"
    (DDPM integer timesteps with `alphas_cumprod`, prediction eps / v / x0) or "flow"
    (flow matching on x_t = (1 - t) x0 + t eps, prediction velocity (default) / sample /
    epsilon, the network seeing t * `time_scale`, e.g. 1000 for diffusers-style timesteps;
    t in [t_min, t_max], or sigma_min / sigma_max given as sigmas). The network is called
    as net(x_in, c_noise, **cond), net(x_vp, t, **cond) when discrete, net(x_t, t *
    time_scale, **cond) when flow; `has_bottleneck` as in bench.adapters.Preconditioned
    (continuous kinds). `prediction=None` is the kind's default: epsilon, velocity for flow.
    """

    net: torch.nn.Module
    shape: tuple[int, int, int]
    kind: str = "edm"
    prediction: str | None = None
    sigma_data: float = 0.5
    sigma_min: float | None = None
    sigma_max: float | None = None
    alphas_cumprod: Tensor | None = None
    has_bottleneck: bool = False
    time_scale: float = 1.0
    t_min: float | None = None
    t_max: float | None = None


KINDS = ("edm", "vp", "ve", "discrete", "flow")
FLOW_ALIASES = {"v": "velocity", "flow": "velocity", "x0": "sample", "eps": "epsilon"}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def import_factory(target: str) -> Callable[..., Any]:
    """`pkg.mod:fn` or `path/to/file.py:fn` -> the function."""
    module_name, sep, fn_name = target.rpartition(":")
    if "=" in fn_name or "=" in module_name:  # options written after ':' instead of ';'
        raise UsageError(
            f"factory '{target}': options follow the function after ';', not ':' "
            "(e.g. 'factory:mypkg.nets:build;weights=net.pt;channels=64', quoted in the shell)"
        )
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


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or of a torch state dict (`torch.load` with
    weights_only=True: tensors and containers, no code), tried by the name's suffix first
    (.pt, .pth, .bin, .ckpt: torch); a checkpoint holding the state dict under "state_dict"
    (Lightning) or "model" is unwrapped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelLoadError(f"factory: no such weights file '{path}'")
    if not path.endswith(STATE_DICT_SUFFIXES):
        try:
            return load_file(path)
        except SafetensorError:
            pass  # perhaps a torch file under another name
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one that pickles code
        raise ModelLoadError(f"factory: weights {path} are neither safetensors nor a torch state dict "
                             f"(torch.load weights_only: {reason(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"factory: {path} holds no state dict of tensors; save net.state_dict()")
    return dict(state)


def load_weights(net: torch.nn.Module, path: str, strip_prefix: str = "") -> None:
    """Load a state dict (safetensors or torch) into `net`, every key matching once
    `strip_prefix` is taken off the keys that carry it (e.g. "network." or "module.")."""
    state = read_state_dict(path)
    if strip_prefix:
        if not any(k.startswith(strip_prefix) for k in state):
            raise ModelLoadError(f"factory: no key of {path} starts with strip_prefix '{strip_prefix}' "
                                 f"(its first: {next(iter(state), 'none')})")
        state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"factory: weights {path} do not match the network: {reason(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        prefixes = sorted({k.split(".")[0] + "." for k in result.unexpected_keys if "." in k})
        hint = f"; strip a key prefix with strip_prefix= (e.g. {prefixes[0]})" if prefixes and \
            len(prefixes) == 1 and not strip_prefix else ""
        raise ModelLoadError(
            f"factory: weights {path} do not match the network: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}{hint}"
        )


def check_shape(shape: Any) -> tuple[int, int, int]:
    """The declared shape as (C, H, W) of positive integers, or a one-line UsageError."""
    try:
        c, h, w = (int(v) for v in shape)
        ok = min(c, h, w) > 0 and all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"factory: shape {shape!r} is not (C, H, W) of positive integers, e.g. (1, 28, 28)")
    return (c, h, w)


def wrap_declared(declared: Declared) -> Denoiser:
    """The Denoiser for a declared network (bench.adapters)."""
    kind, shape = declared.kind, check_shape(declared.shape)
    if kind not in KINDS:
        raise UsageError(f"factory: unknown kind '{kind}'; use {', '.join(KINDS)}")
    if kind == "flow":
        return wrap_flow(declared, shape)
    prediction = PREDICTION_ALIASES.get(declared.prediction or "epsilon", declared.prediction or "epsilon")
    if prediction not in PREDICTIONS:
        raise UsageError(f"factory: unknown prediction '{declared.prediction}'; use eps, v or x0")
    if kind == "discrete":
        if declared.alphas_cumprod is None:
            raise UsageError("factory: kind 'discrete' needs alphas_cumprod")
        return DiscreteVP(
            declared.net,
            declared.alphas_cumprod,
            shape,
            prediction=prediction,
            net=declared.net,
            sigma_data=declared.sigma_data,
        )
    if kind in ("edm", "ve") and prediction != "epsilon":
        raise UsageError(f"factory: kind '{kind}' has its own output F; "
                         "prediction is for vp, discrete and flow")
    return Preconditioned(
        declared.net,
        kind,
        shape,
        sigma_data=declared.sigma_data,
        prediction=prediction,
        sigma_min=declared.sigma_min,
        sigma_max=declared.sigma_max,
        has_bottleneck=declared.has_bottleneck,
    )


def wrap_flow(declared: Declared, shape: tuple[int, int, int]) -> Flow:
    """bench.adapters.Flow: t range from t_min / t_max, or from sigma_min / sigma_max
    (t = sigma / (1 + sigma)), else Flow's own [1e-3, 1 - 1e-3]."""
    prediction = FLOW_ALIASES.get(declared.prediction or "velocity", declared.prediction or "velocity")
    if prediction not in FLOW_PREDICTIONS:
        raise UsageError(f"factory: kind 'flow' has no prediction '{declared.prediction}'; "
                         f"use {', '.join(FLOW_PREDICTIONS)}")
    if not (isinstance(declared.time_scale, int | float) and declared.time_scale > 0):
        raise UsageError(f"factory: time_scale {declared.time_scale!r} must be positive, e.g. 1000")

    # Each end in t: given as t, or as sigma, or Flow's default
    def t_of(t: float | None, sigma: float | None, default: float) -> float:
        return float(t) if t is not None else sigma / (1 + sigma) if sigma is not None else default

    return Flow(
        declared.net,
        shape,
        prediction=prediction,
        net=declared.net,
        time_scale=float(declared.time_scale),
        t_min=t_of(declared.t_min, declared.sigma_min, 1e-3),
        t_max=t_of(declared.t_max, declared.sigma_max, 1 - 1e-3),
        sigma_data=declared.sigma_data,
    )


def load_factory(arg: str | None, device=None, **_: Any) -> Denoiser:
    """factory:MODULE:FUNCTION[;weights=FILE][;strip_prefix=P][;key=value...] -- a Python factory."""
    target, given = parse_arg("factory", arg)
    weights, strip_prefix = given.pop("weights", None), given.pop("strip_prefix", "")
    kwargs = {k: cast_like(None, v, f"factory option '{k}'") for k, v in given.items()}
    if weights and not Path(weights).is_file():  # before the factory builds anything
        raise ModelLoadError(f"factory: no such weights file '{weights}'")
    fn = import_factory(target)
    try:  # an option the function does not take, before it runs
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise UsageError(f"factory {target}: {exc}; its options are its keyword arguments") from None
    except ValueError:  # a builtin without a signature: let the call say
        pass
    made = fn(**kwargs)
    # A ready Denoiser, a Declared or a dict of Declared's fields
    if isinstance(made, Denoiser):
        if weights:
            load_weights(made, weights, strip_prefix)
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
            "bench.Denoiser, a bench.Declared or a dict of its fields"
        )
    denoiser = wrap_declared(made)  # kind, prediction and shape checked before the weights load
    if weights:
        load_weights(made.net, weights, strip_prefix)
    return denoiser


SOURCE = ModelSource(
        "factory",
        load_factory,
        "Python factory returning a network and its parameterization: "
        "factory:MODULE|FILE.py:FUNCTION[;weights=FILE.safetensors|.pt][;strip_prefix=P][;key=value]",
    )
