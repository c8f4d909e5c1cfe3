"""Deprecated since 0.3: `bench.store` was split into `bench.rundir` (the run directory,
`bench.Run`), `bench.records` (the record format, validation, migration) and `bench.files`
(atomic writes, checked appends, the lock, caches). Its names still import from here, with a
DeprecationWarning, until 0.4; new code imports them from `bench` or those modules.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

# old name -> (module, name there)
MOVED = {
    "Run": ("rundir", "Run"),
    "CONFIG": ("rundir", "CONFIG"),
    "RESULTS": ("rundir", "RESULTS"),
    "CSV_COLUMNS": ("rundir", "CSV_COLUMNS"),
    "INT_COLUMNS": ("rundir", "INT_COLUMNS"),
    "read_config": ("rundir", "read_config"),
    "FINAL": ("records", "FINAL"),
    "STATUSES": ("records", "STATUSES"),
    "REQUIRED": ("records", "REQUIRED"),
    "TYPED": ("records", "TYPED"),
    "record_problem": ("records", "record_problem"),
    "warn_skipped": ("records", "warn_skipped"),
    "read_records": ("records", "read_lines"),
    "latest": ("records", "latest"),
    "atomic_write": ("files", "atomic_write"),
    "write_json": ("files", "write_json"),
    "run_lock": ("files", "lock"),
    "writable_dir": ("files", "writable_dir"),
    "writable_file": ("files", "writable_file"),
    "cache_dir": ("files", "cache_dir"),
    "fingerprint": ("files", "fingerprint"),
}
LOCK = ".lock"


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Deprecated: `Run(dir).append(record)`."""
    from .files import append_line
    from .records import line_of

    warnings.warn("bench.store.append_record is deprecated; use bench.Run(dir).append(record)",
                  DeprecationWarning, stacklevel=2)
    append_line(Path(path), line_of(record))


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module 'bench.store' has no attribute '{name}'")
    module, new = MOVED[name]
    warnings.warn(f"bench.store.{name} is deprecated since 0.3; import it from bench.{module}"
                  + (f" (as {new})" if new != name else ""), DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f".{module}", __package__), new)
