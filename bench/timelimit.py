"""The time limit on one cell (`bench run --cell-timeout SECONDS`).

In the main thread of a process on a POSIX system the limit is a SIGALRM timer whose
handler raises `CellTimeout` inside the running Python code: a sampler stuck in a Python
loop or a sleep fails its cell and the run goes on. A single call into native code (one
huge torch op) is interrupted only when it returns to Python. Where signals cannot be
used (another thread, Windows) the limit is not enforced, and `enforced()` says so; under
torchrun a hung rank ends the run at BENCH_DIST_TIMEOUT instead.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class CellTimeout(Exception):
    """A cell ran past its time limit."""


def enforced() -> bool:
    """Whether a time limit can be enforced here: SIGALRM exists and this is the main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def cell_limit(seconds: float, world_size: int = 1) -> float | None:
    """The seconds a cell may run where that is enforced: in the main thread of a one-process
    run; None elsewhere (and for 0, no limit)."""
    if not seconds or world_size > 1 or not enforced():
        return None
    return seconds


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "the cell") -> Iterator[None]:
    """Raise CellTimeout inside the block once `seconds` have passed (None or 0: no limit;
    nothing is enforced where `enforced()` is false)."""
    if not seconds or not enforced():
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"{what} ran past --cell-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
