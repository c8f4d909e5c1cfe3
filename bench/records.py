"""A cell's record: the line results.jsonl holds for it, its format number, what a valid one
holds (and the bounds a report will render), and how records of older formats are read.

Formats (each record carries `format`; a record without one is read by its shape):

- 0: written before cell specs, no `spec`: never comparable with anything (`bench compare`
  says so), shown by reports.
- 1: with a `spec` (sampler-bench 0.2), no `format` field.
- 2: `format: 2` (sampler-bench 0.3).

`migrate` brings a record of any known format to the current one, one step at a time
(asv's `update_to_N`); a record of a newer format than this code reads is skipped with a
warning that says to upgrade.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

FORMAT = 2
MAX_NFE = 100_000  # network calls per sample a cell may spend (bench.config.MAX_NFE)
MAX_VALUE = 1e15  # a metric value or time past this is not a measurement a report renders

STATUSES = ("ok", "infeasible", "failed")
FINAL = ("ok", "infeasible")  # records that a rerun keeps; failed cells are retried

# --- Migration --------------------------------------------------------------------------


def format_of(record: dict[str, Any]) -> int:
    """The record's format: its `format` field, else 1 with a spec and 0 without."""
    stated = record.get("format")
    if isinstance(stated, int) and not isinstance(stated, bool):
        return stated
    return 1 if isinstance(record.get("spec"), dict) else 0


def update_to_1(record: dict[str, Any]) -> dict[str, Any]:
    """Format 0 -> 1: a record from before cell specs gets `spec: null` (it matches nothing)."""
    return {**record, "spec": None, "format": 1}


def update_to_2(record: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the format number, which records carry from now on."""
    return {**record, "format": 2}


UPDATES = {0: update_to_1, 1: update_to_2}


def migrate(record: dict[str, Any]) -> dict[str, Any]:
    """The record in the current format, from any older one (ValueError for a newer one);
    `format_read` keeps the format it was written in when that was older."""
    written = format_of(record)
    if written > FORMAT:
        raise ValueError(f"written in record format {written} by a newer sampler-bench (this one reads up "
                         f"to {FORMAT}); upgrade sampler-bench")
    for version in range(written, FORMAT):
        record = UPDATES[version](record)
    return {**record, "format_read": written} if written < FORMAT else record


# --- Validation ------------------------------------------------------------------------

NUMBER = (int, float)
# The fields every record has, and the types of those that reports, reruns and compare read
REQUIRED: dict[str, Any] = {"cell_id": str, "status": str, "model": str, "method": str, "nfe": int}
TYPED: dict[str, Any] = {
    "sampler": str, "schedule": str, "modifiers": list, "spec": dict, "metrics": dict, "floor": dict,
    "num_samples": int, "batch_size": int, "seed": int, "steps": int, "nfe_counted": int,
    "nfe_extra": int, "nfe_equiv": NUMBER, "wall_s": NUMBER, "model_s": NUMBER, "overhead_s": NUMBER,
    "metric_s": NUMBER, "calibration_s": NUMBER, "reason": str, "grid": str, "replicates": str,
    "cell_index": int, "repeat": int, "environment": dict, "options": dict, "sigmas": list,
    "format": int, "stochastic": bool, "race": dict,
}
# Bounds of the numbers reports render: (low, high), both inclusive
BOUNDS: dict[str, tuple[float, float]] = {
    "nfe": (0, MAX_NFE), "nfe_counted": (0, MAX_NFE), "nfe_extra": (0, 1e9), "nfe_equiv": (0, 1e9),
    "num_samples": (1, 1e12), "batch_size": (1, 1e12), "seed": (0, 2**62), "steps": (0, MAX_NFE),
    "wall_s": (0, MAX_VALUE), "model_s": (0, MAX_VALUE), "overhead_s": (-MAX_VALUE, MAX_VALUE),
    "metric_s": (0, MAX_VALUE), "calibration_s": (0, MAX_VALUE), "cell_index": (0, 1e12),
    "repeat": (0, 1e12),
}


def record_problem(record: Any) -> str | None:
    """Why `record` cannot be read as a cell's record (a field missing, of the wrong type, or
    a number no report can render), or None when it can."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = next((key for key in REQUIRED if record.get(key) is None), None)
    if missing:
        return f"no '{missing}'"
    for key, kind in {**TYPED, **REQUIRED}.items():
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            return f"'{key}' is {type(value).__name__} {_brief(value)}"
        if key in BOUNDS and not _within(value, *BOUNDS[key]):
            return f"'{key}' is {_brief(value)}, outside [{BOUNDS[key][0]:g}, {BOUNDS[key][1]:g}]"
    if record["status"] not in STATUSES:
        return f"status {_brief(record['status'])} is none of {', '.join(STATUSES)}"
    for field in ("metrics", "floor"):
        for name, value in (record.get(field) or {}).items():
            problem = value_problem(value)
            if problem:
                return f"{'metric' if field == 'metrics' else 'floor of'} '{name}' {problem}"
    return None


def value_problem(value: Any) -> str | None:
    """Why a stored metric value is not {"value": finite number, "std": finite number >= 0 or
    null} within the bounds a report renders, or None."""
    if not isinstance(value, dict):
        return "is not {\"value\": number, \"std\": number or null}"
    v, std = value.get("value"), value.get("std")
    if not (isinstance(v, NUMBER) and not isinstance(v, bool) and _within(v, -MAX_VALUE, MAX_VALUE)):
        return f"has value {_brief(v)}, not a finite number within ±{MAX_VALUE:g}"
    if std is not None and not (isinstance(std, NUMBER) and not isinstance(std, bool)
                                and _within(std, 0, MAX_VALUE)):
        return f"has std {_brief(std)}, not a finite number >= 0 (or null)"
    return None


def _within(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."


_warned: set[tuple[str, str, str]] = set()


def warn_skipped(path: Path, where: str, why: str) -> None:
    """One warning on stderr per bad entry (`where`) of a file, not again on a second reading."""
    if (str(path), where, why) not in _warned:
        _warned.add((str(path), where, why))
        print(f"warning: {path} {where} skipped: {why}", file=sys.stderr)


def checked(entries: list[tuple[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Of (where, entry) pairs, the entries that are records, each in the current format; every
    other one is skipped with a warning naming `path` and where it stands."""
    out = []
    for where, record in entries:
        problem = record_problem(record)
        if problem is None:
            try:
                record = migrate(record)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            warn_skipped(path, where, problem)
        else:
            out.append(record)
    return out


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file, in order and in the current format; a line that is not
    one (cut short by a crash, not JSON, not UTF-8, wrong fields) is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            records += checked([(f"line {lineno}", json.loads(raw.decode("utf-8")))], path)
        except UnicodeDecodeError:
            warn_skipped(path, f"line {lineno}", "not UTF-8 text")
        except ValueError:
            warn_skipped(path, f"line {lineno}", "not JSON (cut short by a crash?)")
    return records


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record of each cell, in the order cells first appeared."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id[r["cell_id"]] = r  # a dict keeps a key's first position
    return list(by_id.values())


def line_of(record: dict[str, Any]) -> bytes:
    """The record as its results.jsonl line, in the current format."""
    plain = {k: v for k, v in record.items() if k != "format_read"}
    return (json.dumps({**plain, "format": FORMAT}, sort_keys=True) + "\n").encode()
