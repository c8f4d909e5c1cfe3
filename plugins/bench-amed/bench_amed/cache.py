"""Fitted predictors on disk: safetensors files keyed by everything that shapes a fit.

The key holds the model spec and a fingerprint of its weights and description, the
schedule's sigmas, the budget (with AFS), the sampler and its base options, the fit and
predictor options, and this plugin's version. A file's name carries a digest of its key
and its metadata the whole key, checked on loading: a file that cannot be read, holds
non-finite weights or another key is refitted, never trusted. Predictors committed with
the package (`bench_amed/fitted`) are looked up first, then the user cache
($BENCH_CACHE/amed, default ~/.cache/sampler-bench/amed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize

import bench

from . import __version__
from .predictor import AMEDPredictor, PredictorConfig, weights_are_finite

FORMAT = 1
PACKAGED = Path(__file__).parent / "fitted"
META = "bench_amed"  # the safetensors metadata name


def cache_dir() -> Path:
    """$BENCH_CACHE/amed, or ~/.cache/sampler-bench/amed."""
    return bench.cache_dir("amed")


def cache_key(
    model, sigmas, sampler: str, *, afs: bool, base_options: dict, fit_options: dict, predictor: dict
) -> dict[str, Any]:
    """Everything a fitted predictor depends on: the file format and this plugin's version,
    the model (its spec, and the fingerprint of its weights and description) and the fit."""
    fitted = {"sampler": sampler, "sigmas": [float(s) for s in sigmas.float().cpu()],
              "nfe": 2 * (len(sigmas) - 1) - int(afs), "afs": afs, "base": base_options, "fit": fit_options,
              "predictor": predictor}
    model_key = {"model": getattr(model, "spec", "") or "", "fingerprint": bench.fingerprint(model)}
    return {"format": FORMAT, "plugin": f"bench-amed=={__version__}", **model_key, **fitted}


def entry_name(key: dict[str, Any]) -> str:
    return f"{key['sampler']}-nfe{key['nfe']}-{bench.digest(key)[:16]}.safetensors"


def save(path: Path, predictor: AMEDPredictor, key: dict[str, Any], stats: dict[str, Any]) -> Path:
    """Write atomically (bench.atomic_write). The metadata is one JSON string under one name:
    safetensors orders several names arbitrarily, which would make the bytes of two
    identical fits differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in predictor.state_dict().items()}
    meta = {"key": key, "config": predictor.config.to_json(), "stats": stats}
    return bench.atomic_write(path, serialize(tensors, metadata={META: json.dumps(meta, sort_keys=True)}))


def metadata(path: Path) -> dict[str, Any]:
    """A stored predictor's key, predictor shape ("config") and fit statistics."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})[META])


def load(path: Path, key: dict[str, Any]) -> tuple[AMEDPredictor | None, str]:
    """(predictor, "ok") or (None, why): "missing", "corrupt" or "stale"."""
    if not path.is_file():
        return None, "missing"
    try:
        meta = metadata(path)
        if meta["key"] != json.loads(json.dumps(key)):
            return None, "stale"
        predictor = AMEDPredictor(PredictorConfig(**meta["config"]))
        predictor.load_state_dict(load_file(str(path)), strict=True)
    except Exception:  # unreadable, truncated, wrong shapes, bad metadata: refit
        return None, "corrupt"
    if not weights_are_finite(predictor):
        return None, "corrupt"
    return predictor.eval().requires_grad_(False), "ok"
