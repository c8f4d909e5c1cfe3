"""Start-up cost of the `bench` command, as ratios to `python -c "import torch"` timed in the
same run (absolute times depend on the machine and its load; the ratios much less).

    OMP_NUM_THREADS=1 python benchmarks/startup.py [--repeats 5]

Targets: `bench --help` and `bench --version` import no torch and take under 0.5 s;
`bench list`, `bench list samplers` and `bench plugins` take under 1.3x `import torch`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = str(Path(sys.executable).with_name("bench"))
COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "bench --version": [BENCH, "--version"],
    "bench --help": [BENCH, "--help"],
    "bench list": [BENCH, "list"],
    "bench list samplers": [BENCH, "list", "samplers"],
    "bench plugins": [BENCH, "plugins"],
}
TARGETS = {"bench --version": ("s", 0.5), "bench --help": ("s", 0.5), "bench list": ("x", 1.3),
           "bench list samplers": ("x", 1.3), "bench plugins": ("x", 1.3)}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
    return time.perf_counter() - start


def torch_imported(argv: list[str]) -> bool:
    """Whether the command imports torch (python -X importtime lists every import)."""
    code = f"import sys; sys.argv = {argv[1:]!r}; from bench.cli import main; main(sys.argv)"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                         text=True).stderr
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in err.splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # Interleaved rounds, so a change in load hits every command alike; the median of each
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            times[name].append(wall(argv))
    base = statistics.median(times['python -c "import torch"'])
    print(f"{'command':28} {'median s':>9} {'x import torch':>15}  torch?  target")
    ok = True
    for name, argv in COMMANDS.items():
        t = statistics.median(times[name])
        imports = torch_imported(argv) if name.startswith("bench") else True
        target, met = "", True
        if name in TARGETS:
            kind, limit = TARGETS[name]
            met = (t < limit and not imports) if kind == "s" else t / base < limit
            target = f"< {limit} s, no torch" if kind == "s" else f"< {limit}x"
            target += " ok" if met else " MISSED"
        ok &= met
        print(f"{name:28} {t:9.3f} {t / base:15.2f}  {'yes' if imports else 'no':6}  {target}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
