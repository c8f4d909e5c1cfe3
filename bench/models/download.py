"""Downloads for model sources: the cache, a short deadline, one-line offline errors.

Presets land in $BENCH_CACHE (default ~/.cache/sampler-bench); a download that cannot
finish in time, or any download when BENCH_OFFLINE is set, is a ModelLoadError that says
where to put the file by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

TIMEOUT_S = 10.0  # connect / read timeout for downloads; never hang offline


def cache_dir() -> Path:
    """Where downloads go: $BENCH_CACHE, else ~/.cache/sampler-bench."""
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "sampler-bench")


def offline() -> bool:
    return os.environ.get("BENCH_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() in a daemon thread, abandoned after `seconds` (DNS lookups ignore socket timeouts)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def reason(exc: BaseException) -> str:
    """A network error in a few words."""
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def open_url(url: str) -> Any:
    """urlopen with a short timeout and an overall deadline; no retries."""
    return with_deadline(lambda: urllib.request.urlopen(url, timeout=TIMEOUT_S), TIMEOUT_S)


def fetch(url: str, dest: Path, what: str) -> Path:
    """`dest` if cached, else downloaded from `url` with a short timeout; errors in one line."""
    if dest.is_file():
        return dest
    hint = f"download {url} and put it at {dest}"
    if offline():
        raise ModelLoadError(f"{what} is not cached and BENCH_OFFLINE is set; {hint}")
    # Connect within the deadline, then stream into a partial file renamed when complete
    part = dest.with_name(dest.name + ".part")
    try:
        response = open_url(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        with response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(part, dest)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        part.unlink(missing_ok=True)
        raise ModelLoadError(f"{what} is not cached and cannot be fetched ({reason(exc)}); {hint}") from None
    return dest
