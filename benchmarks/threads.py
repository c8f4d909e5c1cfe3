"""A grid's wall-clock quiet and beside one busy process, for --threads 1 and 2, in one run
(the ratios are what matters: absolute times depend on the machine).

    python benchmarks/threads.py [--samplers all --nfe 5,10,20]

Target: with the default (--threads 1) the grid beside a busy neighbour stays within 1.5x
of its quiet time; two OpenMP threads spin-wait for a core the neighbour holds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = str(Path(sys.executable).with_name("bench"))
BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"


def timed(grid: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([BENCH, "run", *grid, "--threads", str(threads), "--out", out, "--quiet", "--report",
                        "csv"], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", default="all")
    parser.add_argument("--nfe", default="5,10,20")
    args = parser.parse_args()
    grid = ["--samplers", args.samplers, "--nfe", args.nfe]
    results = {}
    for threads in (1, 2):
        results[(threads, "quiet")] = timed(grid, threads)
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            results[(threads, "busy")] = timed(grid, threads)
        finally:
            busy.kill()
            busy.wait()
    print(f"{'threads':>7} {'quiet s':>9} {'busy s':>9} {'busy/quiet':>11}")
    for threads in (1, 2):
        q, b = results[(threads, "quiet")], results[(threads, "busy")]
        print(f"{threads:>7} {q:9.1f} {b:9.1f} {b / q:11.2f}")
    ratio = results[(1, "busy")] / results[(1, "quiet")]
    print(f"default (--threads 1) beside a busy process: {ratio:.2f}x its quiet time (target < 1.5x)")
    return 0 if ratio < 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
