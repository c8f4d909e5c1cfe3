"""Peak RSS of a run with the digits feature metrics at 2k and 20k samples.

Streaming metrics keep memory flat: FID keeps running moments, KID and precision/recall
keep 64 floats a sample and compute in blocks of bounded size. Each measurement is a
fresh process running `benchmarks/peak_rss.py` (the real CLI, one torch and BLAS thread).
Skipped by the project's default options (`--benchmark-skip`); run with

    pytest benchmarks/test_peak_rss.py --benchmark-only -s

BENCH_RSS_MODEL changes the model (default digits-optimal, the exact denoiser of the digits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("peak_rss.py")
MODEL = os.environ.get("BENCH_RSS_MODEL", "digits-optimal")
COUNTS = (2000, 20000)
# The 20k run holds 18k more feature rows (4.4 MiB, a few copies at the end) and allocator
# noise; measured: 931.5 MiB at 2k, 945.9 MiB at 20k (digits-optimal, 2-core CPU)
SLACK_MIB = 32


def measure(num_samples: int) -> dict:
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(num_samples), MODEL],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **threads},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_samples(benchmark):
    rows = benchmark.pedantic(lambda: [measure(n) for n in COUNTS], rounds=1, iterations=1)
    print()
    for r in rows:
        print(
            f"{r['num_samples']:>6} samples: peak RSS {r['peak_rss_mib']:7.1f} MiB "
            f"(before the run {r['rss_before_mib']:.1f} MiB), wall {r['wall_s']} s, model {r['model']}"
        )
    benchmark.extra_info.update({str(r["num_samples"]): r for r in rows})
    small, large = rows
    assert small["exit_code"] == large["exit_code"] == 0
    assert large["peak_rss_mib"] <= small["peak_rss_mib"] + SLACK_MIB
