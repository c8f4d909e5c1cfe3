"""How options are written and read: `key=value` pairs (one parser for every place that takes
them), a plugin name with options (`Spec`, `name:key=value:key=value`), each value cast to
the type of its declared default (`resolve_options`), and `digest`, the hash that names
cells and cache entries.

    Spec.parse("heun:afs=true")                 # Spec("heun", (("afs", "true"),))
    parse_pairs(["rel=0.1", "abs=0"], lambda item: f"'{item}' is not key=value")
    resolve_options("sampler", "heun", {"afs": False}, {"afs": "true"})   # {"afs": True}
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageError


def parse_pairs(items: Iterable[str], error: Callable[[str], str]) -> list[tuple[str, str]]:
    """["k=v", ...] -> [("k", "v"), ...], stripped; an item without `=` or without a key is a
    UsageError whose message `error(item)` gives (each caller names where the item came from)."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(error(item))
        pairs.append((key.strip(), value.strip()))
    return pairs


@dataclass(frozen=True)
class Spec:
    """A plugin name with options, written `name:key=value:key=value` on the command line."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Spec:
        name, *pairs = text.strip().split(":")
        if not name.strip():
            raise UsageError(f"'{text}' names nothing; write name or name:key=value")
        options = parse_pairs(pairs, lambda pair: f"option '{pair}' of '{text}' is not key=value")
        return cls(name.strip(), tuple(options))

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])


def sorted_spec(spec: Spec | None) -> str | None:
    """The spec with its options in a fixed order: `heun:afs=auto:churn=0` and
    `heun:churn=0:afs=auto` are one cell."""
    return None if spec is None else str(Spec(spec.name, tuple(sorted(dict(spec.options).items()))))


def digest(obj: Any) -> str:
    """sha1 of an object's sorted JSON: the name of a cell, a cache entry, a key."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def resolve_options(kind: str, name: str, known: Mapping[str, Any], given: Mapping[str, Any]):
    """Defaults of `known` overridden by `given`, each given value cast to the default's type."""
    out = dict(known)
    for key, raw in given.items():
        if key not in known:
            listing = ", ".join(sorted(known)) or "none"
            raise UsageError(f"{kind} '{name}' has no option '{key}'; its options: {listing}")
        out[key] = cast_like(known[key], raw, f"{kind} '{name}' option '{key}'")
        check_finite(known[key], out[key], f"{kind} '{name}' option '{key}'")
    return out


def check_finite(default: Any, value: Any, what: str) -> None:
    """A float option is finite (NaN never), unless the option's own default is infinite:
    `s_tmax=inf` is EDM's, `eta=nan` is a typo."""
    if isinstance(value, float) and not math.isfinite(value):
        allowed = isinstance(default, float) and math.isinf(default) and not math.isnan(value)
        if not allowed:
            raise UsageError(f"{what}: {value} is not a finite number; give a finite value")


def cast_like(default: Any, raw: Any, what: str) -> Any:
    """Cast a command-line string to the type of `default` (bool, int, float, str, None)."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if default is None:
            for cast in (int, float):
                try:
                    return cast(raw)
                except ValueError:
                    pass
            return None if raw.lower() == "none" else raw
    except ValueError:
        raise UsageError(f"{what}: cannot read '{raw}' as {type(default).__name__}") from None
    return raw
