"""Searched schedules on disk: small JSON files keyed by everything that shapes a search.

The key holds the method, the model spec and a fingerprint of its weights and description,
the sigma range, the steps and terminal convention, the search solver with the options that
change its arithmetic, the search options and this plugin's version. A file's name carries
a digest of its key and the file the whole key, checked on loading: a file that cannot be
read, holds another key or sigmas that are not n + 1 finite decreasing values is searched
again, never trusted. Schedules committed with the package (`bench_learned_schedules/fitted`)
are looked up first, then the user cache ($BENCH_CACHE/learned-schedules, default
~/.cache/sampler-bench/learned-schedules).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import bench

from . import __version__

FORMAT = 1
PACKAGED = Path(__file__).parent / "fitted"


def cache_dir() -> Path:
    """$BENCH_CACHE/learned-schedules, or ~/.cache/sampler-bench/learned-schedules."""
    return bench.cache_dir("learned-schedules")


def cache_key(
    method: str, model, n: int, to_zero: bool, solver: str, solver_options: dict, search: dict
) -> dict[str, Any]:
    """Everything a searched schedule depends on: the file format and this plugin's version,
    the model (its spec, the fingerprint of its weights and description, its sigma range) and
    the search."""
    model_key = {"model": getattr(model, "spec", "") or "", "fingerprint": bench.fingerprint(model),
                 "sigma_range": [float(model.sigma_min), float(model.sigma_max)]}
    searched = {"method": method, "steps": n, "to_zero": bool(to_zero), "solver": solver,
                "solver_options": solver_options, "search": search}
    return {"format": FORMAT, "plugin": f"bench-learned-schedules=={__version__}", **model_key, **searched}


def entry_name(key: dict[str, Any]) -> str:
    return f"{key['method']}-{key['solver']}-steps{key['steps']}-{bench.digest(key)[:16]}.json"


def save(path: Path, sigmas: list[float], key: dict[str, Any], stats: dict[str, Any]) -> Path:
    """Write atomically (bench.atomic_write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return bench.atomic_write(path, json.dumps({"key": key, "sigmas": sigmas, "stats": stats}, indent=1,
                                               sort_keys=True) + "\n")


def load(path: Path, key: dict[str, Any]) -> tuple[list[float] | None, str]:
    """(sigmas, "ok") or (None, why): "missing", "corrupt" or "stale"."""
    if not path.is_file():
        return None, "missing"
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != json.loads(json.dumps(key)):
            return None, "stale"
        sigmas = [float(s) for s in entry["sigmas"]]
    except Exception:  # unreadable, truncated, bad fields: search again
        return None, "corrupt"
    ok = len(sigmas) == key["steps"] + 1 and all(math.isfinite(s) for s in sigmas)
    if not ok or not all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False)):
        return None, "corrupt"
    return sigmas, "ok"
