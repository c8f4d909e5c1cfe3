"""The `bench` command line end to end, in subprocesses, at small sizes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from bench.cli import main
from bench.rundir import CSV_COLUMNS

FAULTY = """
import torch
import bench
from bench import Plan, Sampler

def explode(model, x, sigmas, **_):
    raise RuntimeError("solver diverged")

def nan(model, x, sigmas, **_):
    return model(x, sigmas[0]) * float("nan")

def greedy(model, x, sigmas, **_):
    for _ in range(len(sigmas) + 3):  # more calls than its plan says
        x = model(x, sigmas[0])
    return x

one = lambda nfe, o: Plan(nfe, nfe)

@bench.hookimpl
def register_samplers(register):
    register(Sampler("explode", explode, one, "NFE = steps", "raises"))
    register(Sampler("nan", nan, one, "NFE = steps", "returns NaN"))
    register(Sampler("greedy", greedy, one, "NFE = steps", "overspends"))
"""


def bench(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}  # wide tables: no wrapping inside cells
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = bench("run", "--samplers", "euler,heun:afs=false", "--nfe", "3,4", "--num-samples", "30",
                 "--batch-size", "16", "--model", "mixture", "--metrics", "fd", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "results.jsonl", "results.csv", "report.md"):
        assert (out / name).exists(), name
    # The console table: samplers as rows, budgets as columns
    assert "NFE 3" in proc.stdout and "NFE 4" in proc.stdout and "infeasible" in proc.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert list(rows[0])[: len(CSV_COLUMNS)] == CSV_COLUMNS and "fd" in rows[0]
    cells = {(r["sampler"], r["nfe"]): r for r in rows}
    # Heun stopping at sigma_min without the analytical first step spends 2 * steps: even only
    assert cells[("heun:afs=false", "3")]["status"] == "infeasible"
    assert "2 * steps" in cells[("heun:afs=false", "3")]["reason"]
    assert cells[("heun:afs=false", "4")]["nfe_counted"] == "4"
    assert cells[("euler", "4")]["nfe_counted"] == "4"
    assert "heun:afs=false" in (out / "report.md").read_text()
    # The same command again resumes: nothing reruns
    again = bench("run", "--samplers", "euler,heun:afs=false", "--nfe", "3,4", "--num-samples", "30",
                  "--batch-size", "16", "--model", "mixture", "--metrics", "fd", "--out", str(out), "--quiet")
    assert again.returncode == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    # report re-renders from the stored results
    (out / "report.md").unlink()
    assert bench("report", str(out), "--report", "markdown").returncode == 0
    assert (out / "report.md").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samplers", "eulr"], "unknown sampler 'eulr' (closest: euler)"),
        (["--schedule", "karas"], "unknown schedule 'karas' (closest: karras)"),
        (["--model", "mixtre"], "unknown model 'mixtre' (closest: mixture)"),
        (["--nfe", "5,ten"], "--nfe: 'ten' is not a positive integer"),
        (["--nfe", "0"], "--nfe: '0' is not a positive integer"),
        (["--metrics", "fdd"], "unknown metric 'fdd' (closest: fd)"),
        (["--samplers", "ddim:eta"], "option 'eta' of 'ddim:eta' is not key=value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["run", *args, "--report", "csv", "--out", str(tmp_path / "x"), "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_failing_samplers_fail_their_cells_and_the_run_goes_on(plugin_site, tmp_path):
    plugin_site("bench-faulty", FAULTY)
    out = tmp_path / "run"
    proc = bench("run", "--samplers", "explode,nan,greedy,euler", "--nfe", "3", "--num-samples", "8",
                 "--model", "mixture", "--metrics", "fd", "--out", str(out), "--quiet")
    assert proc.returncode == 1
    assert "3 of 4 cells failed" in proc.stderr
    records = {json.loads(line)["sampler"]: json.loads(line) for line in (out / "results.jsonl").open()}
    assert records["euler"]["status"] == "ok"
    assert records["explode"]["status"] == "failed" and "solver diverged" in records["explode"]["reason"]
    assert records["nan"]["status"] == "failed" and "non-finite" in records["nan"]["reason"]
    assert records["greedy"]["status"] == "failed" and "BudgetExceeded" in records["greedy"]["reason"]


def test_plugins_and_list_commands(plugin_site):
    plugin_site("bench-faulty", FAULTY, version="0.3")
    plugin_site("bench-broken", "raise ImportError('missing dependency xyz')\n")
    proc = bench("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["dist"]: p for p in json.loads(proc.stdout)}
    assert plugins["bench-faulty"]["version"] == "0.3"
    assert plugins["bench-faulty"]["registered"]["samplers"] == ["explode", "nan", "greedy"]
    assert "missing dependency xyz" in plugins["bench-broken"]["error"]
    listing = bench("list", "samplers")
    assert listing.returncode == 0 and "NFE = 2*steps - afs" in listing.stdout
