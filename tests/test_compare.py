"""`bench compare`, `bench check`, `bench baseline`: golden outputs on committed example
results, and a deliberately degraded sampler (a real plugin distribution) failing the check.

tests/data/compare/{base,head} hold a real run (gaussian model, euler/heun/ddim at NFE 3-5)
whose head was edited to contain every verdict; tests/data/compare/README.md lists the edits.
Set BENCH_UPDATE_GOLDEN=1 to rewrite the expected outputs after an intended change.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.compare import Tolerance, compare_runs, load, speed, write_baseline, z_score

DATA = Path(__file__).parent / "data" / "compare"


def golden(name: str, text: str) -> None:
    """Compare `text` with tests/data/compare/<name>, or rewrite it on request."""
    path = DATA / name
    if os.environ.get("BENCH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def bench(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the real CLI in-process; (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- Golden outputs on committed results ------------------------------------------------


def test_compare_golden_output(capsys):
    code, out, _ = bench(capsys, "compare", DATA / "base", DATA / "head")
    assert code == 0  # compare reports, it does not gate
    golden("expected_compare.txt", out)


def test_compare_verdicts_cover_every_case():
    verdicts = {(c.method, c.nfe): c.verdict for c in compare_runs(load(DATA / "base"), load(DATA / "head"))}
    assert verdicts == {
        ("euler", 3): "worse",  # both metrics 1.5x
        ("euler", 4): "better",  # both metrics 0.8x
        ("euler", 5): "worse",  # quality within tolerance, wall-clock 6x
        ("heun", 3): "newly failing",
        ("heun", 4): "fixed",
        ("heun", 5): "not comparable",  # plugin version changed
        ("ddim", 3): "not comparable",  # sample count changed
        ("ddim", 4): "same",  # 1.2x but within the reported spread
        ("ddim", 5): "missing",
        ("euler", 6): "new",
    }


def test_changed_sample_count_is_not_comparable_never_a_regression(capsys, tmp_path):
    cells = {(c.method, c.nfe): c for c in compare_runs(load(DATA / "base"), load(DATA / "head"))}
    assert cells[("ddim", 3)].reason == "num_samples 64 -> 128"
    assert not cells[("ddim", 3)].changes  # no metric is judged across sample counts
    # Not a failure of `bench check`, unless --strict asks that every cell be checked
    baseline = write_baseline(load(DATA / "base"), tmp_path / "example.json", {})
    code, out, err = bench(capsys, "check", DATA / "head", "--baseline", baseline)
    assert "ddim @ NFE 3" not in err and "not comparable  num_samples 64 -> 128" in out
    code, _, err = bench(capsys, "check", DATA / "head", "--baseline", baseline, "--strict")
    assert code == 1 and "ddim @ NFE 3 on gaussian: not comparable: num_samples 64 -> 128" in err


def test_check_golden_failure_message(capsys, tmp_path):
    baseline = write_baseline(load(DATA / "base"), tmp_path / "example.json", {"model": "gaussian"})
    code, out, err = bench(capsys, "check", DATA / "head", "--baseline", baseline)
    assert code == 1
    golden("expected_check_stderr.txt", err.replace(str(baseline), "BASELINE"))
    # The offending cells name the sampler, the budget and the numbers
    assert "euler @ NFE 3 on gaussian: rmse 0.2612 -> 0.3918 (+50.0%)" in err
    assert "heun @ NFE 3 on gaussian: newly failing: ok -> failed: FloatingPointError" in err


def test_baseline_file_round_trips_and_keeps_hand_tuned_tolerances(tmp_path):
    path = tmp_path / "b.json"
    write_baseline(load(DATA / "base"), path, {"model": "gaussian", "trust_pickle": False})
    data = json.loads(path.read_text())
    data["tolerances"]["fd"] = {"rel": 0.5, "abs": 0.0}
    path.write_text(json.dumps(data))
    write_baseline(load(DATA / "base"), path, {"model": "gaussian"})
    data = json.loads(path.read_text())
    assert data["tolerances"]["fd"] == {"rel": 0.5, "abs": 0.0}
    assert all("environment" not in r for r in data["records"])
    assert [r["cell_id"] for r in load(path).records] == [r["cell_id"] for r in load(DATA / "base").records]


# --- The judging rules ------------------------------------------------------------------


def test_tolerance_is_a_factor_either_way_and_an_absolute_floor():
    tol = Tolerance(rel=0.1, abs=0.01)
    assert not tol.exceeded(1.0, 1.1) and tol.exceeded(1.0, 1.11)
    assert not tol.exceeded(1.0, 1 / 1.1) and tol.exceeded(1.0, 0.9)  # asv's factor, both ways
    assert not tol.exceeded(0.001, 0.005)  # 5x, but below the absolute floor
    assert tol.exceeded(-1.0, -1.2) and not tol.exceeded(-1.0, -1.05)  # signs: relative to |base|


def test_speed_is_wall_clock_in_the_cells_own_model_calls():
    cell = {"wall_s": 3.0, "model_s": 2.0, "nfe_counted": 10, "num_samples": 1000, "batch_size": 500}
    assert speed(cell) == pytest.approx(15.0)  # 10 calls, plus half as long again outside them
    assert speed(cell | {"nfe_equiv": 12.5}) == pytest.approx(18.75)  # extra low-resolution calls
    # Without in-model time: the run's calibration, per batch
    assert speed(cell | {"model_s": 0.0, "calibration_s": 0.1}) == pytest.approx(15.0)
    assert speed(cell | {"model_s": None}) is None


def test_z_score_uses_both_standard_errors():
    assert z_score(1.0, 1.5, 0.3, 0.4) == pytest.approx(1.0)
    assert z_score(1.0, 1.0, 0.0, 0.0) == 0.0 and z_score(1.0, 2.0, 0.0, 0.0) == math.inf


def test_bad_input_is_a_usage_error(capsys, tmp_path):
    code, _, err = bench(capsys, "check", "--baseline", tmp_path / "none.json")
    assert code == 2 and "bench baseline update none" in err
    code, _, err = bench(capsys, "compare", DATA / "base", DATA / "head", "--tolerance", "fd=0.1")
    assert code == 2 and "METRIC:rel=R" in err
    stale = write_baseline(load(DATA / "base"), tmp_path / "stale.json", {"no_such_option": "x"})
    code, _, err = bench(capsys, "check", "--baseline", stale)
    assert code == 2 and "--no-such-option x are not known" in err
    (tmp_path / "junk.json").write_text("[1, 2]")
    code, _, err = bench(capsys, "compare", tmp_path / "junk.json", DATA / "head")
    assert code == 2 and "not a baseline file" in err


# --- A degraded sampler fails `bench check`; an improved one passes ---------------------

PROBE = '''
"""A test plugin: Euler's method plus deliberate noise of std BENCH_PROBE_ERROR."""
import os

from bench import Plan, Sampler, hookimpl


def sample_probe(model, x, sigmas, *, noise=None, callback=None, **_):
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x + float(os.environ["BENCH_PROBE_ERROR"]) * noise()


@hookimpl
def register_samplers(register):
    register(Sampler("probe", sample_probe, lambda nfe, options: Plan(steps=nfe, nfe=nfe),
                     "NFE = steps", "Euler plus a set error"))
'''


@pytest.fixture
def probe_baseline(plugin_site, monkeypatch, tmp_path, capsys):
    """A baseline of the probe sampler, written by `bench baseline update` at error 0.3."""
    plugin_site("bench-probe", PROBE)
    monkeypatch.setenv("BENCH_PLUGINS", "bench-probe,bench-classic")
    monkeypatch.setenv("BENCH_PROBE_ERROR", "0.3")
    # Tiny tensors: one intra-op thread, so a busy machine's second core is not waited on
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path / "probe.json"
    grid = "--samplers probe --model gaussian --nfe 4,8 --num-samples 32".split()
    code, out, _ = bench(capsys, "baseline", "update", path, *grid, "--out", tmp_path / "base-run")
    assert code == 0 and f"baseline written: {path}" in out
    assert (tmp_path / "base-run" / "report.html").exists()
    yield path
    torch.set_num_threads(threads)


# Wall-clock is not judged here: the toy model's calls take microseconds, so the time outside
# them is noise; the golden test and test_speed_* cover speed
NO_SPEED = ("--tolerance", "wall:rel=inf")


def test_degraded_sampler_fails_check_naming_sampler_budget_numbers(probe_baseline, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_PROBE_ERROR", "1.0")
    code, out, err = bench(capsys, "check", "--baseline", probe_baseline, *NO_SPEED)
    assert code == 1
    assert "check FAILED" in err
    for nfe in (4, 8):
        says = f"probe @ NFE {nfe} on gaussian: reference_rmse"
        line = next(line for line in err.splitlines() if says in line)
        base, head = (float(v) for v in line.split(": reference_rmse ")[1].split(" (")[0].split(" -> "))
        assert head > 1.1 * base and "z=" in line


def test_improved_sampler_passes_check(probe_baseline, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_PROBE_ERROR", "0.0")
    code, out, err = bench(capsys, "check", "--baseline", probe_baseline, *NO_SPEED)
    assert code == 0, err
    assert "check passed" in out and "probe @ NFE 4" in out and "better" in out


def test_check_reads_a_finished_run_instead_of_rerunning(probe_baseline, tmp_path, capsys):
    shutil.copytree(tmp_path / "base-run", tmp_path / "copy")
    code, out, _ = bench(capsys, "check", tmp_path / "copy", "--baseline", probe_baseline)
    assert code == 0 and "2 cells: 2 same" in out
