"""The results store: `reports/<run>/results.jsonl`, one JSON line per finished cell.

Lines are appended with a single checked write and fsync, so a crash or a full disk loses
at most the cell in flight: a short write is cut back to the last good line. Every other
file of a run is written whole or not at all (`atomic_write`). On reading, a line that is
not a record (torn, not JSON, wrong fields) is skipped with a warning naming it. Reports
are rendered from this file alone, and a rerun skips the cells it already holds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterator
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
    """Append one JSON line in a single checked write, then fsync. A write that fails or comes
    up short (a full disk) is cut back to the last good line and raised as OSError."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = _last_line_end(fd)
        os.ftruncate(fd, size)  # a fragment left by a writer that died mid-line goes
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(line)} "
                                            f"bytes to {path})")
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # nothing half-written stays
            raise
    finally:
        os.close(fd)


def _last_line_end(fd: int, chunk: int = 1 << 16) -> int:
    """The size of the file's complete lines: its length, or the end of its last newline."""
    end = pos = os.fstat(fd).st_size
    while pos > 0:
        start = max(0, pos - chunk)
        tail = os.pread(fd, pos - start, start)
        if start + len(tail) == end and tail.endswith(b"\n"):
            return end
        cut = tail.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write a file whole or not at all: a temporary file in the same directory, fsynced, then
    renamed over `path`. On failure (a full disk) the temporary file goes and `path` keeps
    what it held."""
    data = data.encode() if isinstance(data, str) else data
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out; a write that makes no progress is a full disk."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (temp file, then rename)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- Reading, and skipping what is not a record ---------------------------------------

STATUSES = ("ok", "infeasible", "failed")
NUMBER = (int, float)
# The fields every record has, and the types of those that reports, reruns and compare read
REQUIRED: dict[str, Any] = {"cell_id": str, "status": str, "model": str, "method": str, "nfe": int}
TYPED: dict[str, Any] = {
    "sampler": str, "schedule": str, "modifiers": list, "spec": dict, "metrics": dict, "floor": dict,
    "num_samples": int, "batch_size": int, "seed": int, "steps": int, "nfe_counted": int,
    "nfe_extra": int, "nfe_equiv": NUMBER, "wall_s": NUMBER, "model_s": NUMBER, "overhead_s": NUMBER,
    "metric_s": NUMBER, "calibration_s": NUMBER, "reason": str, "grid": str, "replicates": str,
    "cell_index": int, "repeat": int, "environment": dict, "options": dict, "sigmas": list,
}


def record_problem(record: Any) -> str | None:
    """Why `record` cannot be read as a cell's record, or None when it can."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    missing = next((key for key in REQUIRED if record.get(key) is None), None)
    if missing:
        return f"no '{missing}'"
    for key, kind in {**TYPED, **REQUIRED}.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"'{key}' is {type(value).__name__} {_brief(value)}"
    if record["status"] not in STATUSES:
        return f"status {_brief(record['status'])} is none of {', '.join(STATUSES)}"
    for name, value in (record.get("metrics") or {}).items():
        if not (isinstance(value, dict) and isinstance(value.get("value"), NUMBER)
                and isinstance(value.get("std"), (*NUMBER, type(None)))):
            return f"metric '{name}' is not {{\"value\": number, \"std\": number or null}}"
    return None


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."


_warned: set[tuple[str, str, str]] = set()


def warn_skipped(path: Path, where: str, why: str) -> None:
    """One warning on stderr per bad line (`where`) of a results file, not again on a second reading."""
    if (str(path), where, why) not in _warned:
        _warned.add((str(path), where, why))
        print(f"warning: {path} {where} skipped: {why}", file=sys.stderr)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a results file, in order; a line that is not one (cut short by a crash,
    not JSON, not UTF-8, wrong fields) is skipped with a warning naming it."""
    if not path.exists():
        return []
    records = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            warn_skipped(path, f"line {lineno}", "not UTF-8 text")
            continue
        except ValueError:
            warn_skipped(path, f"line {lineno}", "not JSON (cut short by a crash?)")
            continue
        problem = record_problem(record)
        if problem:
            warn_skipped(path, f"line {lineno}", problem)
            continue
        records.append(record)
    return records


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.json ({} when there is none), or a UsageError saying what to do."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        reason = f"a JSON {type(data).__name__}, not an object"
    except UnicodeDecodeError:
        data, reason = None, "not UTF-8 text"
    except (OSError, ValueError) as exc:
        data, reason = None, f"{type(exc).__name__}: {str(exc)[:60]}"
    if not isinstance(data, dict):
        raise UsageError(f"{path} is corrupt ({reason}); delete it and rerun the same `bench run` to "
                         "rewrite it (finished cells are kept)")
    return data


# --- The run directory: one writer, writable ------------------------------------------

LOCK = ".lock"


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold DIR/.lock (flock) while a run writes there: a second writer is a UsageError naming
    the first one's pid. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: one writer per directory is up to the user
        yield
        return
    fd = os.open(Path(directory) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"another bench run (pid {holder}) is writing {directory}; wait for it or use "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def writable_dir(path: Path, flag: str = "--out") -> Path:
    """`path` as a directory this process can write in (made if missing), or a UsageError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {path} is not writable ({exc.strerror or exc}); give a directory you "
                         "can write") from None
    return path


def writable_file(path: Path, flag: str = "--out") -> Path:
    """`path` as a file this process can write (its directory made if missing), or a UsageError."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    writable_dir(path.parent, flag=f"{flag} {path}: its directory")
    return path


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
        return cls(d, read_config(d / CONFIG), latest(read_records(d / RESULTS)))

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


# --- Caches: what is fitted, searched or solved for a model ---------------------------------


def cache_dir(name: str) -> Path:
    """$BENCH_CACHE/<name>, else ~/.cache/sampler-bench/<name>: where the harness and plugins
    keep what they fitted, searched or solved for a model (AMED's predictors, searched
    schedules, reference solves)."""
    from .sources.download import cache_dir as root

    return root() / name


def fingerprint(model: Any) -> str:
    """sha1 of a model's describe() and of every weight and buffer, bit for bit: the key of
    anything fitted to it. The harness's NFE counter around it is looked through; any other
    wrapper (a modifier, guidance) is part of what is fingerprinted."""
    import hashlib

    import torch

    from .nfe import CountingDenoiser

    while isinstance(model, CountingDenoiser):
        model = model.inner
    h = hashlib.sha1(json.dumps(model.describe(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
