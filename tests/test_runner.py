"""The runner end to end in-process: exactness, seeding, NFE budgets, failures, resume."""

from __future__ import annotations

import json

import pytest
import torch

from bench import CellSpec, Infeasible, Method, NotApplicable, Run, Spec, build
from bench.errors import UsageError
from bench.models.analytic import gaussian
from bench.plugins import load_registry
from bench.records import read_lines as read_records
from bench.rundir import RESULTS
from bench.runner import RunConfig, run
from bench.seeding import SampleNoise


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def config(tmp_path, samplers, nfe, **kw) -> RunConfig:
    kw.setdefault("num_samples", 40)
    kw.setdefault("batch_size", 40)
    kw.setdefault("metrics", ["fd"])  # rmse's reference solve is costly; tested where it matters
    return RunConfig(
        models=kw.pop("models", ["mixture"]),
        methods=[Method(Spec.parse(s)) for s in samplers],
        nfe=nfe,
        out=tmp_path / "run",
        **kw,
    )


def test_noise_is_per_sample_whatever_the_batch():
    whole = SampleNoise(7, range(10), (1, 4, 4), "cpu")
    parts = [SampleNoise(7, idx, (1, 4, 4), "cpu") for idx in ([0, 1, 2], [3, 4, 5, 6, 7, 8, 9])]
    for _ in range(3):  # the initial latent, then per-step draws of stochastic samplers
        assert torch.equal(whole(), torch.cat([p() for p in parts]))
    assert not torch.equal(SampleNoise(8, [0], (4,), "cpu")(), SampleNoise(7, [0], (4,), "cpu")())


def _deterministic(registry):
    """Deterministic samplers without a fit stage (a fitted one, AMED's, is as accurate as its
    teacher, whose grid is coarser than 128 steps; its own tests check it)."""
    return [n for n in registry.names("samplers")
            if not registry.get("samplers", n).stochastic and registry.get("samplers", n).prepare is None]


def test_every_sampler_converges_to_the_exact_ode_solution(registry):
    """On a single Gaussian the ODE solution is closed form; every deterministic sampler's
    error to it (between its own first and last sigma) must fall by 8x or more from the
    smallest feasible budget in 8..16 to the smallest in 128..136 and end small. Cells are
    built as a run builds them (bench.build); a sampler that does not apply to the model
    (a flow-matching scheduler here) says so and is skipped."""
    model = gaussian()
    for name in _deterministic(registry):
        errors, applies = {}, True
        for budgets in (range(8, 17), range(128, 137)):
            for nfe in budgets:
                try:
                    solve = build(registry, CellSpec("gaussian", Method(Spec(name)), nfe), model, "cpu")
                    out = solve.sample(range(16))
                except NotApplicable:
                    applies = False
                    break
                except Infeasible:
                    continue  # a budget this sampler cannot meet exactly
                exact = model.ode_solution(out.eps.double() * solve.sigmas[0].double(),
                                           float(solve.sigmas[0]), float(solve.sigmas[-1]))
                errors[nfe] = float((out.x0.double() - exact).pow(2).mean().sqrt())
                break
        if not applies:
            continue
        low = [e for n, e in errors.items() if n < 100]
        high = [e for n, e in errors.items() if n > 100]
        assert low and high, f"{name}: no feasible budget in 8..16 and in 128..136"
        assert min(high) < 0.015, f"{name}: error {min(high):.3g} at ~128 NFE"
        assert min(high) < min(low) / 8, f"{name}: error does not fall with NFE: {errors}"


def test_results_do_not_depend_on_batch_size(registry, tmp_path):
    records = []
    for bs in (7, 40):
        cfg = config(tmp_path / str(bs), ["euler", "ddim:eta=1.0"], [5], batch_size=bs,
                     num_samples=20, metrics=["fd", "reference"])
        records.append(run(registry, cfg)[1])
    for a, b in zip(*records, strict=True):
        assert a["status"] == b["status"] == "ok"
        for name, value in a["metrics"].items():
            # equal up to float32 rounding (BLAS may block products by batch size)
            assert value["value"] == pytest.approx(b["metrics"][name]["value"], rel=1e-6, abs=1e-9)


def test_same_noise_for_every_sampler_and_different_seeds_differ(registry, tmp_path):
    """Stochastic samplers repeat under a seed and change with it."""
    r1 = run(registry, config(tmp_path / "a", ["ddim:eta=1.0"], [4], seed=3))[1][0]
    r2 = run(registry, config(tmp_path / "b", ["ddim:eta=1.0"], [4], seed=3))[1][0]
    r3 = run(registry, config(tmp_path / "c", ["ddim:eta=1.0"], [4], seed=4))[1][0]
    assert r1["metrics"] == r2["metrics"]
    assert r1["metrics"]["fd"]["value"] != r3["metrics"]["fd"]["value"]


def test_counted_nfe_and_infeasible_budgets(registry, tmp_path):
    out, records = run(registry, config(tmp_path, ["euler", "heun"], [3, 4]))
    by = {(r["sampler"], r["nfe"]): r for r in records}
    assert by[("euler", 3)]["nfe_counted"] == 3 and by[("euler", 4)]["nfe_counted"] == 4
    assert by[("heun", 3)]["nfe_counted"] == 3 and by[("heun", 3)]["steps"] == 2
    csv = Run.open(out).frame()
    assert list(csv.columns[:5]) == ["model", "method", "sampler", "schedule", "modifiers"]
    assert set(csv["status"]) <= {"ok", "infeasible"}


def test_resume_skips_finished_cells(registry, tmp_path):
    cfg = config(tmp_path, ["euler", "ddim"], [3, 5, 8])
    seen = []

    def stop_after_two(cell, record):
        seen.append(cell.id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(registry, cfg, on_cell=stop_after_two)
    path = cfg.run_dir() / RESULTS
    assert len(read_records(path)) == 2
    with path.open("a") as f:  # a crash mid-write leaves a torn line
        f.write('{"cell_id": "torn')
    _, new = run(registry, cfg)
    assert len(new) == 4  # only the four unfinished cells ran
    final = Run.open(cfg.run_dir()).records
    assert len(final) == 6 and len({r["cell_id"] for r in final}) == 6
    assert [r["cell_id"] for r in final[:2]] == seen


def test_bad_names_are_usage_errors(registry, tmp_path):
    with pytest.raises(UsageError, match="closest: euler"):
        run(registry, config(tmp_path, ["eulr"], [5]))
    with pytest.raises(UsageError, match="unknown model 'mixtur'"):
        run(registry, config(tmp_path, ["euler"], [5], models=["mixtur"]))
    with pytest.raises(UsageError, match="has no option 'et'"):
        run(registry, config(tmp_path, ["ddim:et=1"], [5]))
    with pytest.raises(UsageError, match="cannot read"):
        run(registry, config(tmp_path, ["ddim:eta=lots"], [5]))


def test_records_say_where_and_what_ran(registry, tmp_path):
    out, records = run(registry, config(tmp_path, ["euler"], [4]))
    r = records[0]
    assert r["versions"]["sampler"].startswith("bench-classic==")
    assert r["environment"]["torch"] == torch.__version__
    assert r["model_s"] <= r["wall_s"] and r["overhead_s"] == pytest.approx(r["wall_s"] - r["model_s"])
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["num_samples"] == 40 and "environment" in config_json
