"""`bench skip-tune` and `--modifiers skip-tuning` through the real CLI, on the digits UNet.

One search, then one run that holds every case: the searched cell applies exactly the
stored factors, says so in its record and report, and reproduces the search's metric on
the same samples; factors 1 reproduce the unmodified samples (Euler and DPM-Solver++(2M));
cells without the modifier are untouched although they run after modified ones; the
committed `digits` factors work with no search; a budget with no factors, and a model
without skips, give infeasible cells with a one-line reason while the rest runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from bench_skip_tuning import tuned

from bench import Run, load_model
from bench.cli import main
from bench.testing import load_registry, single_threaded

MODEL = "digits"
SAMPLES = ["--num-samples", "24", "--batch-size", "24", "--seed", "100000"]  # skip-tune: the first seed
RUN_SAMPLES = ["--seeds", "100000-100023", "--batch-size", "24"]  # the same samples in bench run
ONES = "skip-tuning:rho_bottom=1:rho_top=1"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache, so only what the test writes (and the package) is found."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "skip-tuning"


def fid(record: dict) -> float:
    assert record["status"] == "ok", record.get("reason")
    return record["metrics"]["fid_digits"]["value"]


@single_threaded
def test_search_then_run(cache, tmp_path):
    # The search: untuned, (0.7, 1) and (1, 1) for Euler at NFE 3, into the user cache
    search = [
        "--samplers",
        "euler",
        "--nfe",
        "3",
        "--metric",
        "fid-digits",
        "--rho-bottom",
        "0.7,1.0",
        "--rho-top",
        "1.0",
        "--refine",
        "0",
    ]
    assert main(["skip-tune", "--model", MODEL, *search, *SAMPLES]) == 0
    (entry,) = json.loads((cache / tuned.file_name(MODEL)).read_text())["entries"]
    assert [entry[k] for k in ("model", "sampler", "schedule", "nfe")] == [MODEL, "euler", "karras", 3]
    assert entry["rho_bottom"] in (0.7, 1.0) and entry["rho_top"] == 1.0 and entry["candidates"] == 2
    assert entry["value"] <= entry["untuned_value"]  # (1, 1) is a candidate: never worse
    assert entry["command"].startswith(f"bench skip-tune --model {MODEL} --samplers euler --nfe 3")
    # The run: modified cells before the plain ones, on the search's samples
    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        f"{MODEL},mixture",
        "--samplers",
        "euler,dpm++2m",
        "--nfe",
        "3,5",
        "--modifiers",
        f"skip-tuning,{ONES},none",
        "--metrics",
        "fid-digits",
        *RUN_SAMPLES,
        "--out",
        str(out),
        "--quiet",
        "--report",
        "csv,markdown",
    ]
    assert main(argv) == 0
    cells = {
        (r["model"], r["sampler"], (r["modifiers"] or ["none"])[0], r["nfe"]): r
        for r in Run.open(out).records
    }
    searched = cells[(MODEL, "euler", "skip-tuning", 3)]
    applied = searched["modifiers_applied"][0]
    assert applied.startswith(f"skip-tuning:rho_bottom={entry['rho_bottom']:g}:rho_top=1 (2 skips")
    assert f"tuned for euler NFE 3, skip-tuning/{tuned.file_name(MODEL)}" in applied
    assert fid(searched) == pytest.approx(entry["value"], rel=1e-9)
    assert fid(cells[(MODEL, "euler", "none", 3)]) == pytest.approx(entry["untuned_value"], rel=1e-9)
    # Factors 1: the unmodified samples, for both samplers and budgets
    for sampler in ("euler", "dpm++2m"):
        for nfe in (3, 5):
            assert fid(cells[(MODEL, sampler, ONES, nfe)]) == fid(cells[(MODEL, sampler, "none", nfe)])
    # The committed factors of digits (NFE 5) need no search
    committed = cells[(MODEL, "dpm++2m", "skip-tuning", 5)]
    assert "tuned for dpm++2m NFE 5, tuned/digits.json" in committed["modifiers_applied"][0]
    assert fid(committed) > 0
    # No factors for this budget: infeasible, saying how to get them
    missing = cells[(MODEL, "dpm++2m", "skip-tuning", 3)]
    assert missing["status"] == "infeasible"
    assert f"no factors tuned for {MODEL} / dpm++2m@logsnr / NFE 3" in missing["reason"]
    assert f"bench skip-tune --model {MODEL} --samplers dpm++2m --nfe 3" in missing["reason"]
    # No skips at all: infeasible cells; the plain cells of that model still run
    for key, record in cells.items():
        if key[0] == "mixture" and key[2] != "none":
            assert record["status"] == "infeasible"
            assert record["reason"].startswith("skip-tuning is not applicable to model 'mixture'")
    assert fid(cells[("mixture", "euler", "none", 5)]) > 0
    assert "modifiers as applied" in (out / "report.md").read_text()


@single_threaded
def test_committed_factors_cover_the_evidence_cells():
    entries = tuned.read(tuned.PACKAGED / "digits.json")
    assert {("euler", 5), ("euler", 10), ("dpm++2m", 5), ("dpm++2m", 10)} <= {
        (e["sampler"], e["nfe"]) for e in entries
    }
    weights = tuned.fingerprint(load_model("digits", torch.device("cpu"), registry=load_registry()).net)
    for e in entries:
        assert e["model"] == "digits" and e["value"] < e["untuned_value"], e
        assert e["fingerprint"] == weights, (
            "the committed factors were tuned for other digits weights; rerun the search in the README"
        )


@single_threaded
def test_search_on_a_model_without_skips_is_one_line(cache, capsys):
    assert main(["skip-tune", "--model", "mixture", "--nfe", "3", "--num-samples", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: skip-tuning is not applicable to model 'mixture'") and "\n" not in err
