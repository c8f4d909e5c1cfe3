"""The run directory, one object (`bench.Run`): it owns its layout and reads and writes every
file in it.

    DIR/config.json              the configuration, exact command and environment
    DIR/results.jsonl            one record per finished cell (bench.records), appended
    DIR/replicates/<cell>.npz    each cell's paired bootstrap replicates
    DIR/samples/<cell>.png       each cell's grid of its first samples
    DIR/samples/<cell>.npz       with --save-samples, all its samples
    DIR/.lock                    held by the one process writing (a run or a merge)

Records are appended with one checked write and fsync (a crash or a full disk loses at
most the cell in flight); every other file is written whole or not at all. A writer
(`Run.writing`) holds the lock and first removes what killed writers left half-written.
Readers (reports, `bench compare`, `bench merge`) read through the same object: records
migrated to the current format and validated, replicates loaded once and a corrupt file
skipped by name, files outside the directory never read.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import UsageError
from .files import append_line, atomic_write, lock, sweep_temporaries, writable_dir, write_json
from .records import latest, line_of, read_lines, warn_skipped

CONFIG = "config.json"
RESULTS = "results.jsonl"
SAMPLES = "samples"  # each cell's PNG grid and, with --save-samples, its images
REPLICATES = "replicates"  # each cell's paired bootstrap replicates

# The stable columns of results.csv, in order; one column per metric (and `<metric>_std`
# where the metric reports a spread) follows them.
CSV_COLUMNS = [
    "model", "method", "sampler", "schedule", "modifiers", "modifiers_applied", "nfe", "nfe_counted",
    "nfe_extra", "nfe_equiv", "steps", "status", "reason", "wall_s", "model_s", "overhead_s", "metric_s",
    "num_samples", "batch_size", "seed", "device",
]
INT_COLUMNS = ["nfe", "nfe_counted", "nfe_extra", "steps", "num_samples", "batch_size", "seed"]


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.json ({} when there is none), or a UsageError saying what to do."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        reason = f"a JSON {type(data).__name__}, not an object"
    except UnicodeDecodeError:
        data, reason = None, "not UTF-8 text"
    except IsADirectoryError:
        data, reason = None, "a directory, not a file"
    except (OSError, ValueError) as exc:
        data, reason = None, f"{type(exc).__name__}: {str(exc)[:60]}"
    if not isinstance(data, dict):
        raise UsageError(f"{path} is corrupt ({reason}); delete it and rerun the same `bench run` to "
                         "rewrite it (finished cells are kept)")
    return data


class Run:
    """A run directory: its configuration, the latest record of each cell in run order, and
    the files its records name. `Run.open(dir)` reads a finished (or interrupted) run; a
    writer (the runner, `bench merge`) holds `writing()` while it appends. `Run(path, config,
    records)` holds records read elsewhere (a baseline file)."""

    def __init__(self, directory: str | Path, config: dict[str, Any] | None = None,
                 records: list[dict[str, Any]] | None = None) -> None:
        self.dir = Path(directory)
        if config is not None:
            self.config = config
        if records is not None:
            self.records = records
        self._replicates: dict[str, dict[str, Any] | None] = {}

    @classmethod
    def open(cls, directory: str | Path) -> Run:
        """A run directory to read; one that holds no results, or an unfinished merge, is a
        UsageError saying what to do."""
        run = cls(directory)
        if not (run.dir / RESULTS).is_file():
            raise UsageError(f"'{run.dir}' holds no {RESULTS}; give the directory of a run")
        if run.config.get("merging"):
            raise UsageError(f"'{run.dir}' is a `bench merge` that did not finish; rerun the same "
                             "bench merge to complete it")
        return run

    # --- Layout -------------------------------------------------------------------------

    @property
    def results_path(self) -> Path:
        return self.dir / RESULTS

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG

    def grid_path(self, cell_id: str) -> Path:
        return self.dir / SAMPLES / f"{cell_id}.png"

    def samples_path(self, cell_id: str) -> Path:
        return self.dir / SAMPLES / f"{cell_id}.npz"

    def replicates_path(self, cell_id: str) -> Path:
        return self.dir / REPLICATES / f"{cell_id}.npz"

    def relative(self, path: Path) -> str:
        """A path inside the run as its records name it (`samples/<cell>.png`)."""
        return path.relative_to(self.dir).as_posix()

    def file(self, relative: Any) -> Path | None:
        """The file a record names (`grid`, `replicates`), relative to the run directory, when
        it exists and stays inside it; None otherwise (a record naming /etc/passwd or ../x
        gets nothing read)."""
        if not isinstance(relative, str) or not relative:
            return None
        path = (self.dir / relative).resolve()
        return path if path.is_relative_to(self.dir.resolve()) and path.is_file() else None

    # --- Reading -------------------------------------------------------------------------

    @cached_property
    def config(self) -> dict[str, Any]:
        return read_config(self.config_path)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return latest(read_lines(self.results_path))

    def reload(self) -> Run:
        """Forget what was read (the records, config and replicates), to read them again."""
        for name in ("config", "records", "analysis"):
            self.__dict__.pop(name, None)
        self._replicates.clear()
        return self

    def replicates(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The cell's bootstrap replicates {metric: float64 [B]}, read once; None when it has
        none, and for a file that is not a plain npz of numbers (cut short, pickled), which is
        skipped with a warning naming it."""
        import numpy as np

        key = record.get("replicates")
        if key not in self._replicates:
            path, data = self.file(key), None
            if path is not None:
                try:
                    with np.load(path, allow_pickle=False) as npz:
                        data = {k: np.asarray(npz[k], dtype=np.float64) for k in npz.files}
                except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
                    warn_skipped(path, "replicates", f"not a readable npz ({type(exc).__name__}: "
                                                     f"{str(exc)[:60]})")
            self._replicates[key] = data
        return self._replicates[key]

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.records:
            names.update(dict.fromkeys(r.get("metrics", {})))
        return list(names)

    def frame(self):
        """One row per cell with the CSV_COLUMNS, then the metric columns."""
        import pandas as pd

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

    @cached_property
    def analysis(self):
        """The run's analysis (bench.analysis.Analysis: pooled cells, verdicts, marks),
        computed once and shared by every reporter."""
        from .analysis import analyse

        return analyse(self)

    # --- Writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[Run]:
        """Hold the directory's lock (a second writer is a UsageError naming the first) and
        remove the temporary files killed writers left (`bench.files.sweep_temporaries`)."""
        writable_dir(self.dir)
        with lock(self.dir):
            self.sweep()
            yield self

    def sweep(self) -> list[Path]:
        """Remove the temporary files of writers that were killed mid-write (a live writer's
        stay): a run, a merge and `bench report` leave no litter behind another's crash."""
        return sweep_temporaries(self.dir, self.dir / SAMPLES, self.dir / REPLICATES)

    def write_config(self, data: dict[str, Any]) -> None:
        write_json(self.config_path, data)
        self.__dict__["config"] = data

    def update_config(self, **fields: Any) -> None:
        self.write_config({**read_config(self.config_path), **fields})

    def append(self, record: dict[str, Any]) -> None:
        """Append the cell's record (in the current format) with one checked write; OSError
        when it cannot be written, the file then cut back to its last good line."""
        append_line(self.results_path, line_of(record))
        self.__dict__.pop("records", None)

    def write_replicates(self, cell_id: str, arrays: dict[str, Any]) -> str:
        """The cell's replicates as a plain npz, written whole; returns its relative path."""
        import numpy as np

        path = self.replicates_path(cell_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        npz = io.BytesIO()
        np.savez(npz, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})
        atomic_write(path, npz.getvalue())
        return self.relative(path)
