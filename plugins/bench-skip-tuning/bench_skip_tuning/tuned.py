"""Tuned skip factors on disk: JSON files of entries, one per (model, sampler, schedule, NFE).

An entry holds the factors `bench skip-tune` chose, the metric values with and without
them, how they were searched, and a fingerprint of the model's weights: factors tuned
for other weights are never used. Files live in the user cache
($BENCH_CACHE/skip-tuning, default ~/.cache/sampler-bench/skip-tuning), looked up first,
and in this package (`bench_skip_tuning/tuned`, the committed factors of the embedded
`digits` model).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

import bench

FORMAT = 1
PACKAGED = Path(__file__).parent / "tuned"
KEY = ("model", "fingerprint", "sampler", "schedule", "nfe")


def cache_dir() -> Path:
    """$BENCH_CACHE/skip-tuning, or ~/.cache/sampler-bench/skip-tuning."""
    return bench.cache_dir("skip-tuning")


def file_name(model: str) -> str:
    """`digits.json`, `diffusers-ddpm-cifar10-32.json`: the model spec made a file name."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model)[:80]
    return f"{slug}.json"


def fingerprint(net: torch.nn.Module) -> str:
    """sha1 over the network's parameter and buffer names, shapes and bytes."""
    h = hashlib.sha1()
    for name, tensor in sorted(net.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read(path: Path) -> list[dict[str, Any]]:
    """The entries of a factors file ([] if it does not exist)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return list(data.get("entries", [])) if data.get("format") == FORMAT else []


def save(path: Path, entry: dict[str, Any]) -> Path:
    """Add `entry` to the file, replacing one with the same key; written atomically."""
    entries = [e for e in read(path) if [e.get(k) for k in KEY] != [entry[k] for k in KEY]]
    entries.append(entry)
    entries.sort(key=lambda e: (e["model"], e["sampler"], e["schedule"], e["nfe"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    return bench.atomic_write(path, json.dumps({"format": FORMAT, "entries": entries}, indent=2) + "\n")


def candidates(model: str) -> list[Path]:
    """The files that may hold factors for `model`: the user cache first, then the package."""
    return [cache_dir() / file_name(model), PACKAGED / file_name(model)]


def lookup(model: str, fp: str, sampler: str, schedule: str, nfe: int) -> tuple[dict[str, Any], Path] | None:
    """The entry tuned for exactly this model (and weights), sampler, schedule and budget."""
    want = [model, fp, sampler, schedule, nfe]
    for path in candidates(model):
        for entry in read(path):
            if [entry.get(k) for k in KEY] == want:
                return entry, path
    return None


def available(model: str, fp: str) -> list[str]:
    """`euler@karras NFE 5`, ... : what has been tuned for these weights, for error messages."""
    found = {
        f"{e['sampler']}@{e['schedule']} NFE {e['nfe']}"
        for path in candidates(model)
        for e in read(path)
        if e.get("model") == model and e.get("fingerprint") == fp
    }
    return sorted(found)
