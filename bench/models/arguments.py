"""A model spec's argument: the runner splits `--model name:arg` at the first ':'; the arg is
a target followed by `;key=value` options (`parse_arg`, `split_arg`), read by the checkpoint
sources (edm, diffusers, factory), which share the class-label and prediction helpers here.
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
