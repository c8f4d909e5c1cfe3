"""Files written safely: whole or not at all (`atomic_write`), appended lines checked and
synced (`append_line`), one writer per directory (`lock`), stale temporary files of dead
writers removed (`sweep_temporaries`), writable targets checked before work starts, and the
cache root with the model fingerprint that keys what is fitted to a model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UsageError

TEMPORARY = re.compile(r"^\..+\.(\d+)(\.[0-9a-f]+)?\.tmp$")  # `.NAME.PID[.RAND].tmp`


def temporary_name(path: Path) -> Path:
    """A temporary sibling of `path` that names its writer's pid: `.NAME.PID.RAND.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write a file whole or not at all: a temporary file in the same directory, fsynced, then
    renamed over `path`. On failure (a full disk) the temporary file goes and `path` keeps
    what it held."""
    data = data.encode() if isinstance(data, str) else data
    path = Path(path)
    tmp = temporary_name(path)
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


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """A JSON file written atomically."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def append_line(path: Path, line: bytes) -> None:
    """Append one line in a single checked write, then fsync. A fragment left by a writer that
    died mid-line is cut first; a write that fails or comes up short (a full disk) is cut back
    to the last good line and raised as OSError."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = _last_line_end(fd)
        os.ftruncate(fd, size)
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


def sweep_temporaries(*directories: Path) -> list[Path]:
    """Remove the temporary files (`temporary_name`) whose writer is no longer running, i.e.
    what a killed process left behind; a live writer's stay. Returns what was removed."""
    removed = []
    for directory in directories:
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                match = TEMPORARY.match(entry.name)
                if match and entry.is_file(follow_symlinks=False) and not _alive(int(match[1])):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or a pid we cannot ask about: leave its files
    return True


@contextlib.contextmanager
def lock(directory: Path) -> Iterator[None]:
    """Hold DIR/.lock (flock) while a run or a merge writes there: a second writer is a
    UsageError naming the first one's pid. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: one writer per directory is up to the user
        yield
        return
    fd = os.open(Path(directory) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
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
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file, not a directory; give a directory")
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
    if len(path.name.encode()) > 255:
        raise UsageError(f"{flag} {path.name[:40]}...: a file name of {len(path.name.encode())} bytes is "
                         "longer than the 255 a file system allows; give a shorter name")
    writable_dir(path.parent, flag=f"{flag} {path}: its directory")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    return path


# --- Caches: what is fitted, searched or solved for a model ---------------------------------


def cache_dir(name: str) -> Path:
    """$BENCH_CACHE/<name>, else ~/.cache/sampler-bench/<name>: where the harness and plugins
    keep what they fitted, searched or solved for a model (AMED's predictors, searched
    schedules, reference solves)."""
    from .models.download import cache_dir as root

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
