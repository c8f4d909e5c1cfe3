"""Peak resident memory of one whole `bench run` with the digits feature metrics.

    python benchmarks/peak_rss.py NUM_SAMPLES [MODEL]

Runs the real CLI in this process (samples drawn and fed to fid-digits, kid-digits and
pr-digits batch by batch), then prints one JSON line: the sample count, the process's
resident memory before the run and its peak (ru_maxrss) after it, in MiB, and the
wall-clock. One process per measurement, since ru_maxrss only ever grows.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.cli import main

METRICS = "fid-digits,kid-digits,pr-digits"


def rss_mib() -> float:
    """This process's current resident set, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """The process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def measure(num_samples: int, model: str = "digits-optimal") -> dict:
    """One run of euler at NFE 2, batches of 500, into a scratch directory."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "run",
            "--model",
            model,
            "--samplers",
            "euler",
            "--nfe",
            "2",
            "--num-samples",
            str(num_samples),
            "--batch-size",
            "500",
            "--metrics",
            METRICS,
            "--out",
            f"{tmp}/run",
            "--quiet",
            "--report",
            "csv",
        ]
        before, start = rss_mib(), time.perf_counter()
        code = main(args)
        wall = time.perf_counter() - start
    return {
        "num_samples": num_samples,
        "model": model,
        "exit_code": code,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "wall_s": round(wall, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), *sys.argv[2:3])))
