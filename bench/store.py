"""The results store: `reports/<run>/results.jsonl`, one JSON line per finished cell.

Lines are appended with a single write and fsync, so a crash loses at most the cell in
flight; a torn last line is ignored on reading. Reports are rendered from this file
alone, and a rerun skips the cells it already holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import UsageError

RESULTS = "results.jsonl"
CONFIG = "config.json"

# The stable columns of results.csv, in order; one column per metric (and `<metric>_std`
# where the metric reports a spread) follows them.
CSV_COLUMNS = [
    "model",
    "method",
    "sampler",
    "schedule",
    "modifiers",
    "modifiers_applied",
    "nfe",
    "nfe_counted",
    "nfe_extra",
    "nfe_equiv",
    "steps",
    "status",
    "reason",
    "wall_s",
    "model_s",
    "overhead_s",
    "metric_s",
    "num_samples",
    "batch_size",
    "seed",
    "device",
]

INT_COLUMNS = ["nfe", "nfe_counted", "nfe_extra", "steps", "num_samples", "batch_size", "seed"]

# Records that a rerun keeps; failed cells are retried.
FINAL = ("ok", "infeasible")


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write, then fsync; a torn last line stays alone."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # the previous writer died mid-line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a results file; a torn last line is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (temp file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class Run:
    """A run directory: its config and the latest record of each cell, in run order."""

    dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, directory: str | Path) -> Run:
        d = Path(directory)
        if not (d / RESULTS).exists():
            raise UsageError(f"'{d}' holds no {RESULTS}; give the directory of a run")
        config = json.loads((d / CONFIG).read_text()) if (d / CONFIG).exists() else {}
        return cls(d, config, latest(read_records(d / RESULTS)))

    def file(self, relative: Any) -> Path | None:
        """The file a record names (`grid`, `replicates`), relative to the run directory, when
        it exists and stays inside it; None otherwise (a record naming /etc/passwd or ../x
        gets nothing read)."""
        if not isinstance(relative, str) or not relative:
            return None
        path = (self.dir / relative).resolve()
        return path if path.is_relative_to(self.dir.resolve()) and path.is_file() else None

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.records:
            names.update(dict.fromkeys(r.get("metrics", {})))
        return list(names)

    def frame(self) -> pd.DataFrame:
        """One row per cell with the CSV_COLUMNS, then the metric columns."""
        rows = []
        for r in self.records:
            row = {c: r.get(c) for c in CSV_COLUMNS}
            row["modifiers"] = ",".join(r.get("modifiers") or [])
            row["modifiers_applied"] = "; ".join(r.get("modifiers_applied") or [])
            for name, v in r.get("metrics", {}).items():
                row[name] = v.get("value")
                if v.get("std") is not None:
                    row[f"{name}_std"] = v["std"]
            rows.append(row)
        frame = pd.DataFrame(rows)
        extra = [c for c in frame.columns if c not in CSV_COLUMNS]
        frame = frame.reindex(columns=CSV_COLUMNS + extra)
        return frame.astype({c: "Int64" for c in INT_COLUMNS})


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record of each cell, in the order cells first appeared."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id[r["cell_id"]] = r  # a dict keeps a key's first position
    return list(by_id.values())
