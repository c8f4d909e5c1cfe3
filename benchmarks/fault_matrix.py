"""The fault matrix: every fault, bad input and hostile file the harness promises to survive,
each tried for real against `bench` in a subprocess, each outcome classified.

    .venv/bin/python benchmarks/fault_matrix.py [--torchrun-runs 3] [--keep DIR] [--only CLASS,...]

Classes: plugin faults (a cell fails, the run goes on: exit 1, the other cells ok), storage
faults (a full disk, simulated by failing os.write inside the bench process; two writers on
one directory), hostile files (corrupt records and configs), bad input (one line, exit 2,
before any work), the edges (empty comma-list items, OS errors, options a run cannot honour,
records a report must not render, escaping, litter after SIGKILL mid-write, `bench merge`
killed and aimed at a busy directory, plugins that would end the process) and multi-process
runs (torchrun, 2 processes on gloo, exit 0 every time).
An outcome is `clean` when it is what the README promises, `traceback` when stderr holds a
Python traceback, `wrong` for any other behaviour (accepted bad input, a wrong exit code, a
half-written file left) and `lost` when a finished cell's record is gone after the rerun.
Prints the matrix, then every outcome that is not clean.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "mixture", "--metrics", "fd", "--nfe", "3", "--num-samples", "8", "--quiet",
         "--report", "csv"]

# Runs `bench` with os.write failing for files whose path holds one of BENCH_FAULT_PATHS
# (comma list): ENOSPC, or with BENCH_FAULT_SHORT=1 half the bytes written (a disk filling up)
# With BENCH_FAULT_KILL=N the process kills itself with SIGKILL at its N-th such write instead,
# after writing half of it: what a machine's OOM killer or a lost job does mid-write
FULL_DISK = textwrap.dedent("""
    import errno, os, signal, sys
    real, parts = os.write, os.environ["BENCH_FAULT_PATHS"].split(",")
    short = os.environ.get("BENCH_FAULT_SHORT") == "1"
    kill_at, seen = int(os.environ.get("BENCH_FAULT_KILL", "0")), [0]
    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if not any(p in path for p in parts):
            return real(fd, data)
        if kill_at:
            seen[0] += 1
            if seen[0] >= kill_at:
                real(fd, bytes(data[: max(1, len(data) // 2)]))
                os.kill(os.getpid(), signal.SIGKILL)
            return real(fd, data)
        if short and len(data) > 1:
            return real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.write = write
    from bench.cli import main
    sys.argv[0] = "bench"
    raise SystemExit(main(sys.argv[1:]))
""")


def fault_plugin() -> str:
    """The fault-injection plugin the tests register (tests/test_faults.py, FAULTS)."""
    return test_source("FAULTS")


def install(site: Path, dist: str, code: str) -> None:
    """A real plugin distribution on PYTHONPATH: a module and its dist-info entry point."""
    module = dist.replace("-", "_")
    (site / f"{module}.py").write_text(code)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[bench]\nplugin = {module}\n")


@dataclass
class Outcome:
    kind: str
    name: str
    verdict: str  # clean, traceback, wrong, lost
    detail: str = ""


@dataclass
class Bench:
    """Runs `bench` in subprocesses with the fault plugin installed."""

    work: Path
    env: dict[str, str] = field(default_factory=dict)

    def __call__(self, *argv, inject: dict[str, str] | None = None, timeout: float = 300,
                 background: bool = False):
        env = {**self.env, **(inject or {})}
        cmd = [sys.executable, "-c", FULL_DISK] if inject else [sys.executable, "-m", "bench"]
        cmd += [str(a) for a in argv]
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=self.work)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=self.work)


def records(out: Path) -> list[dict]:
    """The parseable records of a run (each line on its own), without the harness's reader."""
    path = out / "results.jsonl"
    if not path.exists():
        return []
    got = []
    for line in path.read_bytes().splitlines():
        try:
            got.append(json.loads(line))
        except ValueError:
            continue
    return got


def torn(out: Path) -> list[str]:
    """Half-written things left in a run directory: unparseable result lines, temp files, empty
    images and reports."""
    bad = []
    path = out / "results.jsonl"
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            bad.append("results.jsonl ends mid-line")
        for i, line in enumerate(data.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                bad.append(f"results.jsonl line {i} is not JSON")
    for p in out.rglob("*"):
        if p.is_file() and (p.name.endswith(".tmp") or (p.suffix in (".png", ".html", ".md", ".npz")
                                                       and p.stat().st_size == 0)):
            bad.append(f"{p.relative_to(out)} left half-written")
    return bad


def classify_error(proc, code: int = 2) -> tuple[str, str]:
    """Bad input: exit `code` with one line `error: ...` is clean."""
    err = proc.stderr.strip()
    if "Traceback" in err:
        return "traceback", err.splitlines()[-1][:160]
    lines = err.splitlines()
    if proc.returncode == 0:
        return "wrong", "accepted (exit 0)"
    if proc.returncode != code or len(lines) != 1 or not lines[0].startswith("error:"):
        return "wrong", f"exit {proc.returncode}, {len(lines)} lines: {err[-160:]}"
    return "clean", lines[0][:160]


# --- The classes ---------------------------------------------------------------------------


def plugin_faults(bench: Bench) -> list[Outcome]:
    """Each faulty sampler beside euler: exit 1, its cell failed with a reason, euler's ok."""
    cases = {"f-uneven": [], "f-plugin-error": [], "f-usage-error": [], "f-exit": [],
             # long enough for euler's cell, lazy imports included, on a loaded machine
             "f-hang": ["--cell-timeout", "20"], "f-rising": []}
    out = []
    for sampler, extra in cases.items():
        run_dir = bench.work / f"fault-{sampler}"
        proc = bench("run", *SMALL, "--batch-size", "4", "--samplers", f"{sampler},euler", "--out", run_dir,
                     *extra)
        by = {r.get("sampler"): r for r in records(run_dir)}
        mine, other = by.get(sampler, {}), by.get("euler", {})
        if "Traceback" in proc.stderr:
            verdict, detail = "traceback", proc.stderr.strip().splitlines()[-1][:160]
        elif other.get("status") != "ok":
            reason = other.get("reason", "")[:100]
            status = other.get("status")
            verdict, detail = "lost", f"euler's cell: {status}, {reason} (exit {proc.returncode})"
        elif proc.returncode != 1 or mine.get("status") != "failed" or not mine.get("reason"):
            verdict, detail = "wrong", f"exit {proc.returncode}, {sampler}: {mine.get('status')}"
        else:
            verdict, detail = "clean", mine["reason"][:160]
        out.append(Outcome("plugin faults", sampler, verdict, detail))
    return out


def storage_faults(bench: Bench) -> list[Outcome]:
    """A full disk at each file a run writes, then a rerun with space; two writers at once."""
    cases = {
        "short write of results.jsonl": ({"BENCH_FAULT_PATHS": "results.jsonl", "BENCH_FAULT_SHORT": "1"}, 1),
        "ENOSPC on results.jsonl": ({"BENCH_FAULT_PATHS": "results.jsonl"}, 1),
        "ENOSPC on sample grids": ({"BENCH_FAULT_PATHS": "/samples/"}, 1),
        "ENOSPC on reports": ({"BENCH_FAULT_PATHS": "report.,results.csv"}, 1),
        "ENOSPC on replicates": ({"BENCH_FAULT_PATHS": "/replicates/"}, 1),
        "ENOSPC on config.json": ({"BENCH_FAULT_PATHS": "config.json"}, 1),
    }
    out = []
    for name, (inject, code) in cases.items():
        run_dir = bench.work / ("disk-" + name.replace(" ", "-").replace(".", ""))
        argv = ["run", *SMALL, "--samplers", "euler,heun", "--nfe", "3,4", "--out", run_dir,
                "--report", "csv,markdown,html"]
        first = bench(*argv, inject=inject)
        left = torn(run_dir)
        again = bench(*argv)
        ok = [r for r in records(run_dir) if r.get("status") in ("ok", "infeasible")]
        if "Traceback" in first.stderr + again.stderr:
            verdict, detail = "traceback", (first.stderr + again.stderr).strip().splitlines()[-1][:160]
        elif left:
            verdict, detail = "wrong", "; ".join(left)[:160]
        elif again.returncode != 0 or len(ok) != 4:
            verdict, detail = "lost", f"rerun exit {again.returncode}, {len(ok)} of 4 cells stored"
        elif first.returncode != code or "No space left on device" not in first.stderr:
            verdict, detail = "wrong", f"exit {first.returncode}: {first.stderr.strip()[-160:]}"
        else:
            said = [line for line in first.stderr.splitlines() if "No space left" in line]
            verdict, detail = "clean", said[-1][:160]
        out.append(Outcome("storage faults", name, verdict, detail))
    out.append(two_writers(bench))
    return out


def two_writers(bench: Bench) -> Outcome:
    """A second `bench run` into a directory another one is writing."""
    run_dir = bench.work / "two-writers"
    first, argv = busy_writer(bench, run_dir)
    second = bench(*argv)
    first.wait(timeout=300)
    verdict, detail = classify_error(second)
    if verdict == "clean" and f"pid {first.pid}" not in detail:
        verdict, detail = "wrong", f"names another pid: {detail}"
    if torn(run_dir) or len(records(run_dir)) != 2:
        verdict, detail = "lost", f"{len(records(run_dir))} records; {torn(run_dir)}"
    return Outcome("storage faults", "two bench run on one --out", verdict, detail)


def busy_writer(bench: Bench, run_dir: Path):
    """A `bench run` into `run_dir` that holds its lock for about 8 s (a cell that hangs until its
    time limit); returns (the process, its argv) once the lock is taken."""
    argv = ["run", *SMALL, "--samplers", "f-hang,euler", "--cell-timeout", "8", "--out", run_dir]
    first = bench(*argv, background=True)
    lock = run_dir / ".lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.2)
    return first, argv


def hostile_files(bench: Bench) -> list[Outcome]:
    """Corrupt results and configs: `bench report` and the rerun skip bad lines by name (exit
    0, a warning each) and refuse a corrupt config in one line (exit 2)."""
    lines = {
        "record {\"foo\": 1}": b'{"foo": 1}',
        "record that is a JSON list": b"[1, 2, 3]",
        "record with wrong-typed fields": b'{"cell_id": 7, "status": "ok", "model": "m", "method": "e", '
                                          b'"nfe": "x"}',
        "record with metrics a string": b'{"cell_id": "x", "status": "ok", "model": "m", "method": "e", '
                                        b'"nfe": 3, "metrics": "fd"}',
        "binary line": b"\x00\xff\xfe\x89PNG\r\n\x1a",
        "wholly binary results.jsonl": None,
    }
    out = []
    for name, line in lines.items():
        run_dir = bench.work / ("hostile-" + str(len(out)))
        argv = ["run", *SMALL, "--samplers", "euler", "--out", run_dir]
        bench(*argv)
        path = run_dir / "results.jsonl"
        if line is None:
            path.write_bytes(os.urandom(2048).replace(b"\n", b"\x00"))
        else:
            with open(path, "ab") as f:
                f.write(line + b"\n")
        report = bench("report", run_dir, "--report", "console,csv,markdown,html,verdict")
        again = bench(*argv)
        both = report.stderr + again.stderr
        if "Traceback" in both:
            verdict, detail = "traceback", both.strip().splitlines()[-1][:160]
        elif report.returncode != 0 or again.returncode != 0 or "warning:" not in report.stderr:
            verdict = "wrong"
            detail = f"report exit {report.returncode}, rerun {again.returncode}: {both[-160:]}"
        else:
            verdict, detail = "clean", next(x for x in report.stderr.splitlines() if "warning:" in x)[:160]
        out.append(Outcome("hostile files", name, verdict, detail))
    for name, content in {"config.json not JSON": b"{oops", "config.json a JSON list": b"[1]",
                          "config.json binary": b"\x00\xff"}.items():
        run_dir = bench.work / ("config-" + str(len(out)))
        argv = ["run", *SMALL, "--samplers", "euler", "--out", run_dir]
        bench(*argv)
        (run_dir / "config.json").write_bytes(content)
        verdicts = [classify_error(bench(*command)) for command in (["report", run_dir], argv)]
        bad = [v for v in verdicts if v[0] != "clean"]
        verdict, detail = bad[0] if bad else verdicts[0]
        out.append(Outcome("hostile files", name, verdict, detail))
    return out


def bad_inputs(bench: Bench) -> list[Outcome]:
    """Each refused with one line and exit 2, before any cell runs."""
    w = bench.work
    (w / "a-file").write_text("x")
    (w / "binary.json").write_bytes(b"\x00\xff\xfe binary")
    (w / "fieldless.json").write_text('{"foo": 1}')
    run = ["run", *SMALL, "--out", w / "bad-out"]
    cases: dict[str, list] = {
        "--device meta": [*run, "--samplers", "euler", "--device", "meta"],
        "--device mps": [*run, "--samplers", "euler", "--device", "mps"],
        "--nfe ²": [*run, "--samplers", "euler", "--nfe", "²"],
        "--shard ²/4": [*run, "--samplers", "euler", "--shard", "²/4"],
        "--seed 10**30": [*run, "--samplers", "euler", "--seed", str(10**30)],
        "--out at a file": ["run", *SMALL, "--samplers", "euler", "--out", w / "a-file"],
        "--out in a read-only directory": ["run", *SMALL, "--samplers", "euler", "--out", "/sys/bench-out"],
        "compare on a binary file": ["compare", w / "binary.json", w / "binary.json"],
        "compare on field-less JSON": ["compare", w / "fieldless.json", w / "fieldless.json"],
        "check on a binary baseline": ["check", "--baseline", w / "binary.json"],
        "plugin new --dir FILE": ["plugin", "new", "bench-x", "--dir", w / "a-file"],
        "train-digits --limit 0": ["train-digits", "--out", w / "w.safetensors", "--limit", "0"],
        "train-digits --limit -5": ["train-digits", "--out", w / "w.safetensors", "--limit", "-5"],
        "train-digits --lr nan": ["train-digits", "--out", w / "w.safetensors", "--lr", "nan"],
        "train-digits --out in a file": ["train-digits", "--out", w / "a-file" / "w.safetensors"],
        "skip-tune --refine -1": ["skip-tune", "--refine", "-1"],
        "skip-tune --out in a file": ["skip-tune", "--out", w / "a-file" / "f.json"],
        "baseline update into a file": ["baseline", "update", w / "a-file" / "b.json", "--model", "mixture"],
        "ddim:eta=nan": [*run, "--samplers", "ddim:eta=nan"],
        "karras:rho=0": [*run, "--samplers", "euler", "--schedule", "karras:rho=0"],
        "heun:afs=banana after euler": [*run, "--samplers", "euler,heun:afs=banana", "--nfe", "4"],
        "--num-samples 10**12": [*run, "--samplers", "euler", "--num-samples", str(10**12)],
        "--nfe 10**9": [*run, "--samplers", "euler", "--nfe", str(10**9)],
        "cells past --cell-timeout": [*run, "--samplers", "euler", "--num-samples", "4000", "--batch-size",
                                      "1", "--nfe", "2000", "--cell-timeout", "1"],
        "--cell-timeout -1": [*run, "--samplers", "euler", "--cell-timeout", "-1"],
        "missing digits weights": [*run, "--samplers", "euler", "--model", f"digits:{w / 'no.safetensors'}"],
        "missing factory weights": [*run, "--samplers", "euler", "--model",
                                    f"factory:bench.testing:gaussian;weights={w / 'none.safetensors'}"],
        "unknown sampler": [*run, "--samplers", "eulr"],
    }
    out = []
    for name, argv in cases.items():
        proc = bench(*argv)
        verdict, detail = classify_error(proc)
        if verdict == "clean" and (w / "bad-out" / "results.jsonl").exists():
            verdict, detail = "wrong", "refused only after cells ran"
        out.append(Outcome("bad input", name, verdict, detail))
        (w / "bad-out" / "results.jsonl").unlink(missing_ok=True)
    return out


def multi_process(bench: Bench, runs: int) -> list[Outcome]:
    """torchrun --nproc_per_node=2 on gloo/CPU, `runs` times: exit 0 and every cell ok each time."""
    out = []
    for i in range(runs):
        run_dir = bench.work / f"torchrun-{i}"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "--monitor-interval=1", "-m", "bench", "run", "--samplers", "euler,heun", "--nfe", "5",
             "--num-samples", "32", "--model", "mixture", "--metrics", "fd", "--out", str(run_dir), "--quiet",
             "--report", "csv"],
            capture_output=True, text=True, env=bench.env, timeout=300, cwd=bench.work)
        got = records(run_dir)
        if "Traceback" in proc.stderr:
            verdict, detail = "traceback", proc.stderr.strip().splitlines()[-1][:160]
        elif len(got) != 2 or any(r.get("status") != "ok" for r in got):
            verdict, detail = "lost", f"{len(got)} records"
        elif proc.returncode != 0:
            verdict, detail = "wrong", f"exit {proc.returncode}: {proc.stderr.strip()[-160:]}"
        else:
            verdict, detail = "clean", "exit 0, 2 cells ok"
        out.append(Outcome("multi-process", f"torchrun 2 processes, run {i + 1}", verdict, detail))
    return out


def test_source(name: str) -> str:
    """A string constant of tests/test_faults.py (the plugins and factories its tests install)."""
    tree = ast.parse((ROOT / "tests" / "test_faults.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return ast.literal_eval(node.value)


def refused(bench: Bench, kind: str, cases: dict[str, list], out: Path | None = None) -> list[Outcome]:
    """Each command refused in one line with exit 2; with `out`, nothing written there."""
    result = []
    for name, argv in cases.items():
        start = time.perf_counter()
        proc = bench(*argv)
        verdict, detail = classify_error(proc)
        if verdict == "clean" and out is not None and (out / "config.json").exists():
            verdict, detail = "wrong", "wrote config.json before refusing"
        if verdict == "clean" and time.perf_counter() - start > 30:
            verdict, detail = "wrong", f"refused only after {time.perf_counter() - start:.0f} s"
        result.append(Outcome(kind, name, verdict, detail))
        if out is not None and out.exists():
            for p in out.rglob("*"):
                if p.is_file():
                    p.unlink()
    return result


def comma_lists(bench: Bench) -> list[Outcome]:
    """Empty items and empty lists: one line, exit 2, no config.json left to claim the directory."""
    out = bench.work / "lists-out"
    run = ["run", "--model", "mixture", "--metrics", "fd", "--num-samples", "8", "--quiet", "--out", out]
    cases = {
        "--nfe 5,,10": [*run, "--samplers", "euler", "--nfe", "5,,10"],
        "--nfe 5,": [*run, "--samplers", "euler", "--nfe", "5,"],
        "--nfe ''": [*run, "--samplers", "euler", "--nfe", ""],
        "--samplers euler,,heun": [*run, "--samplers", "euler,,heun", "--nfe", "3"],
        "--samplers ''": [*run, "--samplers", "", "--nfe", "3"],
        "--schedule ''": [*run, "--samplers", "euler", "--nfe", "3", "--schedule", ""],
        "--model ''": [*run, "--samplers", "euler", "--nfe", "3", "--model", ""],
        "--modifiers ''": [*run, "--samplers", "euler", "--nfe", "3", "--modifiers", ""],
        "--metrics ''": [*run, "--samplers", "euler", "--nfe", "3", "--metrics", ""],
        "--metrics fd,": [*run, "--samplers", "euler", "--nfe", "3", "--metrics", "fd,"],
        "--report csv,,html": [*run, "--samplers", "euler", "--nfe", "3", "--report", "csv,,html"],
    }
    return refused(bench, "comma lists", cases, out)


def os_errors(bench: Bench) -> list[Outcome]:
    """Paths the OS refuses: one line saying what to do, exit 2, never a raw errno."""
    w = bench.work
    (w / "a-file").write_text("x")
    cases = {
        "fit --out at a file": ["fit", "--samplers", "amed-plugin-euler", "--nfe", "5", "--model", "mixture",
                                "--out", w / "a-file"],
        "--out of a 300-character name": ["run", *SMALL, "--samplers", "euler", "--out", w / ("x" * 300)],
        "search --out at a file": ["search", "--model", "mixture", "--samplers", "euler", "--nfe", "5",
                                   "--schedules", "gits", "--out", w / "a-file"],
    }
    result = refused(bench, "OS errors", cases)
    run_dir = w / "config-dir"
    bench("run", *SMALL, "--samplers", "euler", "--out", run_dir)
    (run_dir / "config.json").unlink()
    (run_dir / "config.json").mkdir()
    result += refused(bench, "OS errors", {
        "config.json a directory: run": ["run", *SMALL, "--samplers", "euler", "--out", run_dir],
        "config.json a directory: report": ["report", run_dir],
    })
    return result


def refused_options(bench: Bench) -> list[Outcome]:
    """Options a run cannot honour, refused before work (and a model too big for the device)."""
    w = bench.work
    (w / "oom.py").write_text(test_source("OOM_FACTORY"))
    out = w / "options-out"
    run = ["run", *SMALL, "--samplers", "euler", "--out", out]
    cases = {
        "--metric-option bootstrap=-5": [*run, "--metric-option", "bootstrap=-5"],
        "--metric-option bootstrap=1": [*run, "--metric-option", "bootstrap=1"],
        "--metric-option bootstrap=x": [*run, "--metric-option", "bootstrap=x"],
        "--repeats 100000000": [*run, "--repeats", "100000000"],
        "--batch-size 0": [*run, "--batch-size", "0"],
        "--threads 0": [*run, "--threads", "0"],
        "--tolerance fd:rel=nan": ["compare", w / "binary.json", w / "binary.json",
                                   "--tolerance", "fd:rel=nan"],
        "forward pass out of memory": ["run", "--model", f"factory:{w / 'oom.py'}:build", "--metrics", "rmse",
                                       "--nfe", "2", "--samplers", "euler", "--num-samples", "8", "--quiet",
                                       "--out", out],
    }
    return refused(bench, "options refused", cases, out)


def hostile_results(bench: Bench) -> list[Outcome]:
    """Records a reader parses but a report must not render, and replicates that are not plain
    npz: every reporter and compare exit 0 with a warning naming the file."""
    import numpy as np

    result = []
    base = bench.work / "hostile-base"
    bench("run", *SMALL, "--samplers", "euler,heun", "--nfe", "4", "--out", base)
    good = records(base)[0]
    fd = good["metrics"]["fd"]
    changes = {
        "metric std negative": {"metrics": {"fd": {**fd, "std": -1.0}}},
        "metric std -inf": {"metrics": {"fd": {**fd, "std": float("-inf")}}},
        "nfe 10**30": {"nfe": 10**30},
        "metric value true": {"metrics": {"fd": {**fd, "value": True}}},
        "metric value 1.7e308": {"metrics": {"fd": {**fd, "value": 1.7e308}}},
        "wall_s NaN": {"wall_s": float("nan")},
        "floor value inf": {"floor": {"fd": {"value": float("inf"), "std": 0.1}}},
    }
    for i, (name, change) in enumerate(changes.items()):
        run_dir = bench.work / f"hostile-record-{i}"
        bench("run", *SMALL, "--samplers", "euler,heun", "--nfe", "4", "--out", run_dir)
        with open(run_dir / "results.jsonl", "a") as f:
            f.write(json.dumps({**good, **change, "cell_id": "hostile"}) + "\n")
        result.append(renders(bench, "hostile results", name, run_dir, compare=True))
    spoilers = {"replicates cut short": lambda p: p.write_bytes(p.read_bytes()[:100]),
                "replicates pickled": lambda p: np.savez(p, fd=np.array([{"x": 1}], dtype=object))}
    for name, spoil in spoilers.items():
        run_dir = bench.work / ("spoilt-" + name.split()[-1])
        bench("run", *SMALL, "--samplers", "euler,heun", "--nfe", "4", "--out", run_dir)
        spoil(sorted((run_dir / "replicates").iterdir())[0])
        result.append(renders(bench, "hostile results", name, run_dir, compare=True))
    return result


def renders(bench: Bench, kind: str, name: str, run_dir: Path, compare: bool = False) -> Outcome:
    """`bench report` with every reporter (and `bench compare` of the run with itself): exit 0,
    no traceback, a warning naming what was skipped."""
    report = bench("report", run_dir, "--report", "console,csv,markdown,html,verdict")
    both = report.stderr
    codes = [report.returncode]
    if compare:
        again = bench("compare", run_dir, run_dir)
        both += again.stderr
        codes.append(again.returncode)
    if "Traceback" in both:
        return Outcome(kind, name, "traceback", both.strip().splitlines()[-1][:160])
    if any(codes) or "warning:" not in report.stderr:
        return Outcome(kind, name, "wrong", f"exit {codes}: {both.strip()[-160:]}")
    return Outcome(kind, name, "clean", next(x for x in report.stderr.splitlines() if "warning:" in x)[:160])


def escaping(bench: Bench) -> list[Outcome]:
    """A method name and a metric title from a results file that try to act: a terminal escape
    sequence, a table closed and a heading or script opened in report.md and report.html."""
    run_dir = bench.work / "escaping"
    bench("run", *SMALL, "--samplers", "euler", "--out", run_dir)
    record = records(run_dir)[0]
    record.update(method="x\x1b[2J|</table>\n## <script>alert(1)</script>", cell_id="hostile")
    record["metrics"]["fd"]["title"] = "FD\n# <img src=x onerror=alert(1)>"
    with open(run_dir / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    proc = bench("report", run_dir, "--report", "console,markdown,html")
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    checks = {
        "console: no raw escape sequence": "\x1b[2J" not in proc.stdout and "\\x1b[2J" in proc.stdout,
        "report.md: no raw HTML": "<script>" not in md and "<img" not in md,
        "report.md: no injected heading": not any(x.startswith(("# <", "## <", "## &lt;", "# &lt;"))
                                                    for x in md.splitlines()),
        "report.html: no raw HTML": "<script>" not in html and "<img src=x" not in html,
    }
    out = []
    for name, ok in checks.items():
        if "Traceback" in proc.stderr:
            out.append(Outcome("escaping", name, "traceback", proc.stderr.strip().splitlines()[-1][:160]))
        else:
            out.append(Outcome("escaping", name, "clean" if ok and proc.returncode == 0 else "wrong",
                               f"exit {proc.returncode}"))
    return out


def litter(bench: Bench) -> list[Outcome]:
    """SIGKILL in the middle of each kind of atomic write (a report, a grid, replicates, the
    samples archive) of a run that holds finished cells, then a later `bench report` and
    `bench run`: no temporary file stays."""
    out = []
    cases = {"report.html": ("report.html", True, []), "results.csv": ("results.csv", True, []),
             "sample grid": ("/samples/", False, []), "replicates": ("/replicates/", False, []),
             "samples archive": ("/samples/", False, ["--save-samples"])}
    for i, (name, (where, by_report, extra)) in enumerate(cases.items()):
        run_dir = bench.work / f"killed-{i}"
        argv = ["run", *SMALL, "--samplers", "euler,heun", "--nfe", "3,4", "--out", run_dir, *extra]
        bench(*argv)
        inject = {"BENCH_FAULT_PATHS": where, "BENCH_FAULT_KILL": "1"}
        if by_report:  # the reporter killed mid-write
            killed = bench("report", run_dir, "--report", "csv,html", inject=inject)
        else:  # a cell run again (its record dropped), killed mid-write of its files
            lines = (run_dir / "results.jsonl").read_bytes().splitlines(keepends=True)
            (run_dir / "results.jsonl").write_bytes(b"".join(lines[:-1]))
            killed = bench(*argv, inject=inject)
        left = list(run_dir.rglob("*.tmp"))
        report = bench("report", run_dir, "--report", "csv")
        after_report = [p.name for p in run_dir.rglob("*.tmp")]
        again = bench(*argv)
        after = torn(run_dir)
        if "Traceback" in report.stderr + again.stderr:
            verdict, detail = "traceback", (report.stderr + again.stderr).strip().splitlines()[-1][:160]
        elif killed.returncode != -9 or not left:
            verdict, detail = "wrong", f"no kill mid-write (exit {killed.returncode}, {len(left)} tmp)"
        elif after_report or after or again.returncode != 0 or len(records(run_dir)) != 4:
            verdict, detail = "wrong", f"left {after_report or after}, exit {again.returncode}"
        else:
            verdict, detail = "clean", f"{len(left)} temporary file(s) after the kill, none after report, run"
        out.append(Outcome("litter after a kill", name, verdict, detail))
    return out


def merges(bench: Bench) -> list[Outcome]:
    """`bench merge` killed midway, rerun, and aimed at a directory a run is writing."""
    shards = [bench.work / "shard0", bench.work / "shard1"]
    for i, shard in enumerate(shards):
        bench("run", *SMALL, "--samplers", "euler,heun", "--nfe", "3,4", "--shard", f"{i}/2", "--out", shard)
    total = sum(len(records(s)) for s in shards)
    merged = bench.work / "merged"
    out = []
    killed = bench("merge", *shards, "--out", merged, "--report", "csv",
                   inject={"BENCH_FAULT_PATHS": "merged/results.jsonl", "BENCH_FAULT_KILL": "2"})
    report = bench("report", merged)
    verdict, detail = classify_error(report)
    if killed.returncode != -9:
        verdict, detail = "wrong", f"the kill did not land (exit {killed.returncode})"
    out.append(Outcome("merge", "report of a killed merge", verdict, detail))
    again = bench("merge", *shards, "--out", merged, "--report", "csv")
    got = records(merged)
    if "Traceback" in again.stderr:
        verdict, detail = "traceback", again.stderr.strip().splitlines()[-1][:160]
    elif again.returncode != 0 or len(got) != total or torn(merged):
        verdict, detail = "lost", f"exit {again.returncode}, {len(got)} of {total} records, {torn(merged)}"
    else:
        verdict, detail = "clean", f"rerun completed it: {len(got)} records"
    out.append(Outcome("merge", "the same merge rerun", verdict, detail))
    busy = bench.work / "busy-merge"
    first, _ = busy_writer(bench, busy)
    proc = bench("merge", *shards, "--out", busy)
    first.wait(timeout=300)
    verdict, detail = classify_error(proc)
    mixed = {r.get("num_samples") for r in records(busy)}
    if verdict == "clean" and (len(records(busy)) != 2 or len(mixed) != 1):
        verdict, detail = "lost", f"{len(records(busy))} records, sample counts {mixed}"
    out.append(Outcome("merge", "merge into a directory a run is writing", verdict, detail))
    return out


def process_enders(bench: Bench) -> list[Outcome]:
    """Plugins that would end the process: sys.exit and KeyboardInterrupt at import fail that
    plugin; a sampler's KeyboardInterrupt and a sampler that skips its calls fail their cell."""
    site = bench.work / "enders"
    site.mkdir(exist_ok=True)
    install(site, "bench-ends", test_source("ENDS"))
    install(site, "bench-interrupts", test_source("INTERRUPTS"))
    install(site, "bench-short", test_source("SHORT"))
    env = {**bench.env, "PYTHONPATH": os.pathsep.join([str(site), bench.env.get("PYTHONPATH", "")])}
    enders = Bench(bench.work, env)
    out = []
    for name, argv in {"sys.exit(5) at import: bench list": ["list", "models"],
                       "KeyboardInterrupt at import: bench plugins": ["plugins"]}.items():
        proc = enders(*argv)
        shown = "plugins" not in argv or ("bench-ends" in proc.stdout and "bench-interrupts" in proc.stdout)
        if "Traceback" in proc.stderr:
            verdict, detail = "traceback", proc.stderr.strip().splitlines()[-1][:160]
        elif proc.returncode != 0 or not shown:
            verdict, detail = "wrong", f"exit {proc.returncode}: {proc.stderr.strip()[-160:]}"
        else:
            verdict, detail = "clean", "exit 0, the plugin's error shown by bench plugins"
        out.append(Outcome("plugins that end the process", name, verdict, detail))
    run_dir = bench.work / "enders-run"
    proc = enders("run", *SMALL, "--samplers", "f-lazy,f-interrupts,euler", "--out", run_dir)
    by = {r.get("sampler"): r for r in records(run_dir)}
    for sampler, says in {"f-interrupts": "KeyboardInterrupt raised by plugin code",
                          "f-lazy": "planner promised 3 NFE, sampler spent 0"}.items():
        mine = by.get(sampler, {})
        if "Traceback" in proc.stderr:
            verdict, detail = "traceback", proc.stderr.strip().splitlines()[-1][:160]
        elif by.get("euler", {}).get("status") != "ok":
            verdict, detail = "lost", f"euler: {by.get('euler', {}).get('status')} (exit {proc.returncode})"
        elif proc.returncode != 1 or mine.get("status") != "failed" or says not in mine.get("reason", ""):
            verdict, detail = "wrong", f"exit {proc.returncode}, {sampler}: {mine.get('status')}"
        else:
            verdict, detail = "clean", mine["reason"][:160]
        out.append(Outcome("plugins that end the process", sampler, verdict, detail))
    return out


# --- The matrix ----------------------------------------------------------------------------

VERDICTS = ("clean", "traceback", "wrong", "lost")


def matrix(outcomes: list[Outcome]) -> str:
    kinds = list(dict.fromkeys(o.kind for o in outcomes))
    rows = ["| class | attempts | clean | tracebacks | wrong behaviours | data lost |",
            "|---|---:|---:|---:|---:|---:|"]
    for kind in [*kinds, "all"]:
        mine = [o for o in outcomes if kind in ("all", o.kind)]
        counts = [sum(o.verdict == v for o in mine) for v in VERDICTS]
        rows.append(f"| {kind} | {len(mine)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchrun-runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="a work directory to keep (default: temp)")
    parser.add_argument("--verbose", action="store_true", help="every outcome, clean ones too")
    parser.add_argument("--only", default=None, help="comma list of the classes to try (default all)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    site.mkdir(exist_ok=True)
    install(site, "bench-faults", fault_plugin())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    bench = Bench(work, env)
    classes: list[tuple[str, Callable[[], list[Outcome]]]] = [
        ("plugin faults", lambda: plugin_faults(bench)),
        ("storage faults", lambda: storage_faults(bench)),
        ("hostile files", lambda: hostile_files(bench)),
        ("bad input", lambda: bad_inputs(bench)),
        ("comma lists", lambda: comma_lists(bench)),
        ("OS errors", lambda: os_errors(bench)),
        ("options refused", lambda: refused_options(bench)),
        ("hostile results", lambda: hostile_results(bench)),
        ("escaping", lambda: escaping(bench)),
        ("litter after a kill", lambda: litter(bench)),
        ("merge", lambda: merges(bench)),
        ("plugins that end the process", lambda: process_enders(bench)),
        ("multi-process", lambda: multi_process(bench, args.torchrun_runs)),
    ]
    if args.only:
        wanted = [c.strip() for c in args.only.split(",")]
        unknown = sorted(set(wanted) - {name for name, _ in classes})
        if unknown:
            parser.error(f"--only: unknown class {', '.join(unknown)}; the classes: "
                         + ", ".join(name for name, _ in classes))
        classes = [(name, attempt) for name, attempt in classes if name in wanted]
    outcomes: list[Outcome] = []
    for name, attempt in classes:
        start = time.perf_counter()
        got = attempt()
        outcomes += got
        print(f"{name}: {len(got)} attempts in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(matrix(outcomes))
    shown = [o for o in outcomes if args.verbose or o.verdict != "clean"]
    if shown:
        print()
        for o in shown:
            print(f"- [{o.verdict}] {o.kind} / {o.name}: {o.detail}")
    return 0 if all(o.verdict == "clean" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
