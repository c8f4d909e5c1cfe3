"""Model sources for the checkpoints people actually use, one module each:

    edm.py        edm:PATH|URL|PRESET[;class=K]                NVlabs network pickle (--trust-pickle)
    diffusers.py  diffusers:DIR|OWNER/REPO|PRESET[;prediction=P][;class=K][;resolution=N|HxW][;shift=S]
    factory.py    factory:MODULE|FILE.py:FUNCTION[;weights=FILE][;strip_prefix=P][;key=value...]
    download.py   the cache ($BENCH_CACHE), downloads with deadlines, offline errors

The runner splits `--model name:arg` at the first ':'; the arg is a target followed by
`;key=value` options (`parse_arg`). Each module is a complete ModelSource a third party
can copy: resolve the target, load the network, adapt it to the Denoiser contract
(bench.adapters) and say in one line what to do when something is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import UsageError
from ..options import parse_pairs, resolve_options

PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def parse_arg(source: str, arg: str | None) -> tuple[str, dict[str, str]]:
    """`target;key=value;...` -> (target, {key: value})."""
    target, *pairs = (arg or "").split(";")
    given = dict(parse_pairs(pairs, lambda pair: f"model '{source}:{arg}': option '{pair}' is not key=value"))
    if not target.strip():
        raise UsageError(f"model '{source}' needs an argument: write {source}:... (see `bench list models`)")
    return target.strip(), given


def split_arg(source: str, arg: str | None, known: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`target;key=value;...` -> (target, options cast like `known`'s defaults)."""
    target, given = parse_arg(source, arg)
    return target, resolve_options("model", source, known, given)


def class_indices(n: int, label_dim: int, fixed: int | None, device) -> Tensor:
    """Class `fixed` for every row, else row mod label_dim."""
    if fixed is not None and not label_dim:
        raise UsageError(f"class={fixed} given but the model is unconditional; drop the class option")
    if fixed is not None and not 0 <= fixed < label_dim:
        raise UsageError(f"class={fixed} is out of range; the model has classes 0..{label_dim - 1}")
    rows = torch.arange(n, device=device)
    return torch.full_like(rows, fixed) if fixed is not None else rows % label_dim


def __getattr__(name: str):
    if name == "SOURCES":  # the sources, imported when the registry asks for them
        from .diffusers import SOURCE as DIFFUSERS
        from .edm import SOURCE as EDM
        from .factory import SOURCE as FACTORY

        return (EDM, DIFFUSERS, FACTORY)
    raise AttributeError(name)
