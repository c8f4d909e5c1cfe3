"""NFE budgets through the real runner: counted calls equal the budget, or the cell is
infeasible with the planner's reason; `bench list` shows each sampler's NFE rule."""

from __future__ import annotations

import pytest

import bench
from bench.cli import main
from bench.errors import Infeasible, UsageError
from bench.testing import console_width, samplers_of

BUDGETS = list(range(3, 21))
# Non-default conventions whose budgets are all reachable too
VARIANTS = [
    "heun:denoise_to_zero=false",
    "dpm-solver-2:denoise_to_zero=false",
    "dpm-solver-3:afs=true",
    "unipc:order=2:variant=bh1",
    "ipndm:afs=true",
    "euler:churn=10",
    "dpm++3m:lower_order_final=false:denoise_to_zero=false",
]


def run_grid(registry, tmp_path, specs, budgets=BUDGETS):
    frame = bench.run(model="mixture", samplers=specs, nfe=budgets, num_samples=4, batch_size=4, metrics="fd",
                      out=tmp_path / "run", report="")
    return bench.Run.open(frame.attrs["run_dir"]).records


def check_counted(records, specs, budgets):
    assert len(records) == len(specs) * len(budgets)
    for r in records:
        cell = f"{r['sampler']} @ NFE {r['nfe']}"
        assert r["status"] == "ok", f"{cell}: {r.get('reason')}"
        assert r["nfe_counted"] == r["plan_nfe"] == r["nfe"], cell
        assert "reason" not in r, f"{cell}: {r['reason']}"


def test_counted_nfe_equals_every_budget_from_3_to_20(registry, tmp_path):
    specs = samplers_of("bench-classic")
    check_counted(run_grid(registry, tmp_path, specs), specs, BUDGETS)


def test_other_conventions_count_exactly_too(registry, tmp_path):
    check_counted(run_grid(registry, tmp_path, VARIANTS, BUDGETS[:6]), VARIANTS, BUDGETS[:6])


def test_forced_afs_makes_the_other_parity_infeasible_with_a_reason(registry, tmp_path):
    records = run_grid(registry, tmp_path, ["heun:afs=false", "dpm-solver-2:afs=true"], [6, 7])
    status = {(r["sampler"], r["nfe"]): r for r in records}
    # Stopping at sigma_min (the default), 2 calls a step: without AFS even, with it odd
    assert status[("heun:afs=false", 6)]["status"] == "ok"
    assert status[("dpm-solver-2:afs=true", 7)]["status"] == "ok"
    for key in (("heun:afs=false", 7), ("dpm-solver-2:afs=true", 6)):
        assert status[key]["status"] == "infeasible"
        assert "afs=auto reaches it" in status[key]["reason"]


def test_planners_follow_the_documented_rules(registry):
    plan = lambda text, nfe: registry.get("samplers", text).plan(  # noqa: E731
        nfe, {**registry.get("samplers", text).options}
    )
    # Heun stopping at sigma_min (diff-sampler, the default): NFE = 2 steps, AFS for odd budgets
    assert (plan("heun", 36).steps, plan("heun", 36).options["afs"]) == (18, False)
    assert (plan("heun", 5).steps, plan("heun", 5).options["afs"]) == (3, True)
    # ... and EDM's rule with the step to 0: NFE = 2 steps - 1
    edm = registry.get("samplers", "heun")
    assert edm.plan(35, {**edm.options, "denoise_to_zero": True}).steps == 18
    # DPM-Solver-fast's orders: third order, then 2/1, summing to the budget (less the denoise)
    assert plan("dpm-solver-3", 10).options["orders"] == (3, 3, 3, 1)
    assert plan("dpm-solver-3", 11).options["orders"] == (3, 3, 3, 2)
    dpm3 = registry.get("samplers", "dpm-solver-3")
    assert dpm3.plan(10, {**dpm3.options, "denoise_to_zero": True}).options["orders"] == (3, 3, 2, 1)
    # UniPC runs bh2 (diff-sampler); variant=auto picks bh1 below 10 steps, bh2 from 10
    unipc = registry.get("samplers", "unipc")
    assert plan("unipc", 9).options["variant"] == "bh2"
    assert unipc.plan(9, {**unipc.options, "variant": "auto"}).options["variant"] == "bh1"
    assert unipc.plan(10, {**unipc.options, "variant": "auto"}).options["variant"] == "bh2"
    # One NFE per step; without the final denoise the schedule ends at sigma_min
    p = registry.get("samplers", "dpm++2m").plan(5, {"afs": "auto", "denoise_to_zero": False})
    assert (p.steps, p.to_zero) == (5, False)


def test_bad_option_values_are_usage_errors_and_impossible_budgets_infeasible(registry):
    unipc = registry.get("samplers", "unipc")
    with pytest.raises(UsageError, match="order=5"):
        unipc.plan(10, {**unipc.options, "order": 5})
    with pytest.raises(UsageError, match="afs=maybe"):
        unipc.plan(10, {**unipc.options, "afs": "maybe"})
    heun = registry.get("samplers", "heun")
    with pytest.raises(Infeasible, match="not of that form"):
        heun.plan(1, {**heun.options, "afs": True, "denoise_to_zero": True})


def test_bench_list_shows_every_nfe_rule(registry, capsys):
    with console_width(400):
        assert main(["list", "samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in samplers_of("bench-classic"):
        sampler = registry.get("samplers", name)
        # The sampler's row: one line, its name first
        (row,) = [line for line in lines if line.split()[:1] == [name]]
        assert sampler.nfe_rule in row and f" {sampler.default_schedule} " in row
        # Named, the sampler is shown whole: its rule and every option with its default
        with console_width(400):
            assert main(["list", "samplers", name]) == 0
        shown = capsys.readouterr().out
        assert f"NFE rule: {sampler.nfe_rule}" in shown
        assert all(f"  {k} = {v!r}" in shown for k, v in sampler.options.items())
