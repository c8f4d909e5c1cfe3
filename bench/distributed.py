"""Runs over several processes (torch.distributed) and over several independent jobs.

Several processes, `torchrun --nproc_per_node=N [--nnodes=M ...] -m bench run ...`: every
process loads the model and walks the same grid of cells; the batches of a cell are dealt
in rounds, rank r sampling batch k N + r of round k. A batch keeps its sample indices, so
every sample keeps its seed (seed + index) and its batch mates, and the results equal a
one-process run's whatever N is. After each round rank 0 gathers the samples and alone
feeds the metrics, in batch order: a metric that needs every sample (FID, KID) sees them
all, exactly as in one process. Rank 0 alone writes results and reports. A failure on any
rank is raised on every rank, so the cell fails everywhere with the rank named in its
reason; a rank that dies ends the run with an error, and the finished cells are kept.
Objects travel over a gloo process group on the CPU, whatever the device.

Several jobs, `bench run --shard i/n`: job i runs every n-th cell of the grid into its own
directory; `bench merge` joins the directories into one run and renders its reports.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from .errors import BenchError, UsageError
from .rundir import Run

T = TypeVar("T")

TIMEOUT_ENV = "BENCH_DIST_TIMEOUT"  # seconds a rank waits for the others (default 1800)


class DistributedError(BenchError):
    """A process of a multi-process run failed or could not be reached."""


# --- Processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes; a plain run is a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), joined once per process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        world = cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
        return world

    def device(self, name: str) -> str:
        """`cuda` names this process's own GPU, cuda:LOCAL_RANK, in a multi-process run."""
        return f"cuda:{self.local_rank}" if name == "cuda" and self.size > 1 else name

    def deal(self, items: Iterable[T]) -> Iterator[T | None]:
        """Deal `items` in rounds of `size`: this rank's item of each round, None past the end."""
        items = list(items)
        for start in range(0, len(items), self.size):
            chunk = items[start : start + self.size]
            yield chunk[self.rank] if self.rank < len(chunk) else None

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then on the other ranks (a load that may download into a shared cache)."""
        value = fn() if self.main else None
        self.broadcast(None)
        return value if self.main else fn()

    # Collectives; in a world of one they hand the object straight back

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order; None on the other ranks."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.main else None
        self._collective(dist.gather_object, obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def _collective(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo: a peer closed its connection, or the timeout passed
            detail = re.sub(r"\[[^\]]*\.(cc|cpp):\d+\]\s*", "", str(exc)).strip().split(". ")[0][:120]
            raise DistributedError(
                f"rank {self.rank} of {self.size} lost contact with the other processes ({detail}): "
                "one of them failed (see its error above, or torchrun's summary); finished cells "
                "are kept, rerun the same command to resume"
            ) from None

    # Failures: the first one, as rank 0 sees it, is raised on every rank

    def agree(self, fn: Callable[[], T]) -> T:
        """fn() on every rank; a failure on any rank is raised on all of them."""
        value, failure = self._attempt(fn)
        parts = self.gather(failure)
        self.settle(first_failure(parts) if self.main else None)
        return value

    def collect(self, fn: Callable[[], T]) -> list[T] | None:
        """fn() on every rank, the results gathered on rank 0; a failure anywhere is raised everywhere."""
        value, failure = self._attempt(fn)
        parts = self.gather(value if failure is None else failure)
        self.settle(first_failure(parts) if self.main else None)
        return parts

    def on_main(self, fn: Callable[[], Any]) -> None:
        """fn() on rank 0 alone; its failure is raised on every rank."""
        self.settle(self._attempt(fn)[1] if self.main else None)

    def settle(self, failure: Exception | None) -> None:
        """Raise rank 0's `failure` on every rank (nothing when it is None)."""
        failure = self.broadcast(failure)
        if failure is not None:
            raise failure

    def _attempt(self, fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
        try:
            return fn(), None
        except Exception as exc:
            return None, self._portable(exc)

    def _portable(self, exc: Exception) -> Exception:
        """In a multi-process run: the failure with its rank in the message, fit to send."""
        if self.size == 1:
            return exc
        exc.args = (f"on rank {self.rank}: {exc}",)
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"on rank {self.rank}: {type(exc).__name__}: {exc}")
        return exc


def leave(clean: bool = True) -> None:
    """Leave the process group, if this process joined one: after a last barrier when the run
    ended cleanly (no rank tears gloo down while another still talks to it; a rank exiting
    with gloo's threads alive can abort with SIGABRT), at once otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    except RuntimeError:  # a peer is gone already: nothing left to wait for
        pass
    finally:
        dist.destroy_process_group()


def first_failure(parts: list[Any] | None) -> Exception | None:
    """The first exception among the gathered parts, in rank order."""
    return next((p for p in parts or [] if isinstance(p, Exception)), None)


# --- Jobs -----------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n) -> (i, n): this job runs the cells whose grid index is i mod n."""
    i, sep, n = text.partition("/")
    digits = lambda t: t.strip().isascii() and t.strip().isdigit()  # noqa: E731
    if not sep or not digits(i) or not digits(n) or not 0 <= int(i) < int(n):
        raise UsageError(f"--shard: '{text}' is not i/n with 0 <= i < n, e.g. 0/4 for the first of 4 jobs")
    return int(i), int(n)


# What must agree between the shards of one sweep (the keys of RunConfig.identity)
SWEEP_KEYS = (
    "models",
    "methods",
    "nfe",
    "num_samples",
    "seed",
    "metrics",
    "device",
    "dtype",
    "channels_last",
    "compile",
    "metric_options",
    "prompts",
)


def merge_runs(dirs: list[Path], out: Path, command: str = "") -> Run:
    """Join the run directories of a sweep's shards into `out`: one record per cell, in grid
    order (the latest record of a cell wins), the first shard's configuration, and the files
    the records name (replicates, sample grids and archives). It writes as `bench run` does:
    holding `out`'s lock, each record appended whole, the configuration marked `merging`
    until the last file is in, so an interrupted merge is never read as a run (`bench
    report` says to rerun it) and rerunning the same merge completes it."""
    if not dirs:
        raise UsageError("bench merge: name the run directories to merge")
    runs = [Run.open(d) for d in dirs]
    base = runs[0]
    # The shards must come from one sweep
    for other in runs[1:]:
        for key in SWEEP_KEYS:
            if base.config.get(key) != other.config.get(key):
                raise UsageError(
                    f"bench merge: {base.dir} and {other.dir} differ in {key} "
                    f"({base.config.get(key)} vs {other.config.get(key)}); merge the shards of one sweep"
                )
    cells: dict[str, tuple[Run, dict[str, Any]]] = {}
    pairs = [(run, r) for run in runs for r in run.records]
    for run, r in sorted(pairs, key=lambda pair: pair[1].get("cell_index", 0)):
        cells[r["cell_id"]] = (run, r)
    config = {**base.config, "command": command, "merged_from": [str(d) for d in dirs], "shard": None,
              "model_info": {k: v for run in runs for k, v in run.config.get("model_info", {}).items()}}
    merged = Run(out)
    with merged.writing():
        if merged.results_path.exists() or merged.config_path.exists():
            stored = merged.config
            if not stored.get("merging") or stored.get("merged_from") != config["merged_from"]:
                raise UsageError(f"bench merge: {out} exists and holds another run; give a new --out "
                                 "directory")
        merged.write_config({**config, "merging": True})
        have = {r["cell_id"] for r in merged.records}
        for run, record in cells.values():
            if record["cell_id"] not in have:
                merged.append(_with_files(run, merged, record))
        merged.write_config(config)
    return Run.open(out)


def _with_files(source: Run, target: Run, record: dict[str, Any]) -> dict[str, Any]:
    """The record, the files it names inside its shard (grid, replicates, samples) brought into
    the merged run at the same relative paths (hard-linked where the file system allows, else
    copied; each whole or not at all); a name whose file is missing is dropped."""
    import shutil

    from .files import temporary_name

    out = dict(record)
    for key in ("grid", "replicates", "samples"):
        path = source.file(record.get(key))
        if path is None:
            out.pop(key, None)
            continue
        dest = target.dir / record[key]
        if dest.exists() and os.path.samefile(path, dest):  # linked by an earlier, interrupted merge
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(dest)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return out
