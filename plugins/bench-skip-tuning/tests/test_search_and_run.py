"""`bench skip-tune` and `--modifiers skip-tuning` through the real CLI, on the digits UNet.

The search stores its choice where `bench run` finds it; a run then applies exactly those
factors, says so in its records and reports, reproduces the search's metric value on the
same samples, leaves the cells without the modifier untouched even when they run after
it, and turns a cell it has no factors for, or a model without skips, into an infeasible
cell with a one-line reason. The factors committed for `digits` work with no search.
"""

from __future__ import annotations

import json

import pytest
from bench_skip_tuning import tuned

from bench.cli import main
from bench.store import Run

MODEL = "digits"
SEARCH = [
    "--samplers",
    "euler",
    "--nfe",
    "3",
    "--num-samples",
    "48",
    "--batch-size",
    "48",
    "--metric",
    "fid-digits",
    "--rho-bottom",
    "0.7,1.0",
    "--rho-top",
    "1.0",
    "--refine",
    "0",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache, so only what the test writes (and the package) is found."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "skip-tuning"


def run(tmp_path, name: str, *argv: str) -> dict[tuple[str, int], dict]:
    """`bench run` into tmp_path/name; its records by (first modifier or 'none', NFE)."""
    out = tmp_path / name
    assert (
        main(
            [
                "run",
                "--model",
                MODEL,
                "--out",
                str(out),
                "--quiet",
                "--report",
                "csv,markdown",
                "--metrics",
                "fid-digits",
                *argv,
            ]
        )
        == 0
    )
    return {((r["modifiers"] or ["none"])[0], r["nfe"]): r for r in Run.open(out).records}


def test_search_stores_factors_that_runs_then_use(cache, tmp_path):
    assert main(["skip-tune", "--model", MODEL, *SEARCH]) == 0
    (entry,) = json.loads((cache / "digits.json").read_text())["entries"]
    assert (entry["model"], entry["sampler"], entry["schedule"], entry["nfe"]) == (
        MODEL,
        "euler",
        "karras",
        3,
    )
    assert entry["rho_bottom"] in (0.7, 1.0) and entry["rho_top"] == 1.0 and entry["candidates"] == 2
    assert entry["value"] <= entry["untuned_value"]  # (1, 1) is a candidate: never worse than untuned
    # The run: skip-tuning cells first, then the plain ones; NFE 4 has no tuned factors
    records = run(
        tmp_path,
        "run",
        "--samplers",
        "euler",
        "--nfe",
        "3,4",
        "--modifiers",
        "skip-tuning,none",
        "--num-samples",
        "48",
        "--batch-size",
        "48",
        "--seed",
        str(entry["seed"]),
    )
    tuned_cell, plain = records[("skip-tuning", 3)], records[("none", 3)]
    applied = tuned_cell["modifiers_applied"][0]
    assert applied.startswith(f"skip-tuning:rho_bottom={entry['rho_bottom']:g}:rho_top=1 (2 skips")
    assert "tuned for euler NFE 3" in applied
    # Same samples as the search: the same numbers, with and without the factors
    assert tuned_cell["metrics"]["fid_digits"]["value"] == pytest.approx(entry["value"], rel=1e-9)
    assert plain["metrics"]["fid_digits"]["value"] == pytest.approx(entry["untuned_value"], rel=1e-9)
    missing = records[("skip-tuning", 4)]
    assert missing["status"] == "infeasible"
    assert "no factors tuned for digits / euler@karras / NFE 4" in missing["reason"]
    assert "bench skip-tune --model digits --samplers euler --nfe 4" in missing["reason"]
    assert "modifiers as applied" in (tmp_path / "run" / "report.md").read_text()


def test_unit_factors_reproduce_unmodified_samples_exactly(tmp_path):
    records = run(
        tmp_path,
        "ones",
        "--samplers",
        "euler,dpm++2m",
        "--nfe",
        "4",
        "--modifiers",
        "skip-tuning:rho_bottom=1:rho_top=1,none",
        "--num-samples",
        "32",
    )
    for sampler in ("euler", "dpm++2m"):
        ones = next(r for r in records.values() if r["sampler"] == sampler and r["modifiers"])
        plain = next(r for r in records.values() if r["sampler"] == sampler and not r["modifiers"])
        assert ones["metrics"]["fid_digits"] == plain["metrics"]["fid_digits"]


def test_committed_digits_factors_need_no_search(cache, tmp_path):
    entries = tuned.read(tuned.PACKAGED / "digits.json")
    tuned_for = {(e["sampler"], e["nfe"]) for e in entries}
    assert {("euler", 5), ("euler", 10), ("dpm++2m", 5), ("dpm++2m", 10)} <= tuned_for
    records = run(
        tmp_path,
        "committed",
        "--samplers",
        "euler",
        "--nfe",
        "5",
        "--modifiers",
        "skip-tuning",
        "--num-samples",
        "16",
    )
    (cell,) = records.values()
    assert cell["status"] == "ok", cell.get("reason")
    assert "tuned for euler NFE 5, tuned/digits.json" in cell["modifiers_applied"][0]


def test_model_without_skips(cache, tmp_path, capsys):
    assert main(["skip-tune", "--model", "mixture", *SEARCH]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: skip-tuning is not applicable to model 'mixture'") and "\n" not in err
    # In a run: an infeasible cell with the reason, the other cells still run
    out = tmp_path / "mixture"
    assert (
        main(
            [
                "run",
                "--model",
                "mixture",
                "--samplers",
                "euler",
                "--nfe",
                "3",
                "--num-samples",
                "8",
                "--modifiers",
                "none,skip-tuning:rho_top=1.1",
                "--out",
                str(out),
                "--quiet",
                "--report",
                "csv",
            ]
        )
        == 0
    )
    status = {tuple(r["modifiers"]): (r["status"], r.get("reason", "")) for r in Run.open(out).records}
    assert status[()][0] == "ok"
    assert status[("skip-tuning:rho_top=1.1",)][0] == "infeasible"
    assert "not applicable to model 'mixture'" in status[("skip-tuning:rho_top=1.1",)][1]
