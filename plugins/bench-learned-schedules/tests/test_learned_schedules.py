"""The searched schedules end to end: GITS's dynamic programme against brute force, the
search solvers against the registered samplers, the conformance kit, the searched steps
against the default ones on the analytic mixture through bench.build, the counted search
cost, the cache, the estimate and the committed digits schedules."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from bench_learned_schedules import cache as ls_cache
from bench_learned_schedules import dmn, gits, ld3
from bench_learned_schedules.catalog import FEATURED
from bench_learned_schedules.students import SOLVERS, solve

import bench
from bench import CellSpec, Method, SampleNoise, Spec, build, load_model, resolve
from bench.cli import main
from bench.errors import UsageError
from bench.solvers import heun_step
from bench.testing import check_schedule, methods_from, mixture

METHODS = ("gits", "ld3", "dmn")

# Searches small enough for unit tests, on the analytic models
TINY = {
    "gits": {"grid": 21, "warmup": 16, "batch": 16, "teacher_sub": 2},
    "ld3": {"samples": 16, "batch": 16, "epochs": 6, "teacher_steps": 24, "lr": 0.1},
    "dmn": {"iters": 50},
}


def spec_of(name: str, options: dict) -> Spec:
    return Spec(name, tuple((k, str(v)) for k, v in options.items()))


# --- GITS's dynamic programme -------------------------------------------------------------


@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8])
def test_dp_finds_the_brute_force_optimum(coeff):
    """On random cost matrices the DP's path has the least objective of every path with
    that many steps, from the first grid point to the last."""
    rng = np.random.default_rng(0)
    for g, _trial in itertools.product((5, 8), range(4)):
        cost = np.triu(rng.random((g, g)) * 10, k=1) + np.tril(np.full((g, g), np.inf))
        for steps in range(1, g):
            path = gits.dp(cost, steps, coeff)
            assert path[0] == 0 and path[-1] == g - 1 and len(path) == steps + 1
            assert all(a < b for a, b in zip(path, path[1:], strict=False))
            best = min(
                gits.path_cost(cost, [0, *inner, g - 1], coeff)
                for inner in itertools.combinations(range(1, g - 1), steps - 1)
            )
            assert gits.path_cost(cost, path, coeff) == pytest.approx(best, rel=1e-12)


def test_dp_refuses_more_steps_than_the_grid_has():
    with pytest.raises(UsageError, match="raise grid"):
        gits.dp(np.zeros((4, 4)), 4)


# --- The search solvers are the registered samplers ---------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_students_equal_the_registered_samplers(registry, name):
    """The differentiable solve gives the registered sampler's output on the same sigmas."""
    model = mixture(shape=(1, 4, 4))
    recipe = resolve(registry, CellSpec("mixture", Method(Spec(name)), 6))  # options and plan, no sigmas
    sigmas = ld3.schedule(torch.randn(recipe.plan.steps, dtype=torch.float64), 0.002, 80.0)
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    expect = recipe.sampler.sample(model, x, sigmas, noise=None, **recipe.options)
    got = solve(model, x, sigmas, name, recipe.options)
    assert torch.allclose(got, expect, atol=1e-8, rtol=1e-8), float((got - expect).abs().max())


# --- The conformance kit ------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_schedule_conformance(name):
    check_schedule(name, options=TINY[name], steps=(1, 2, 5, 12))


# --- Searched against default steps on the analytic mixture --------------------------------


def reference(model, x_T, steps=200):
    """Heun on a fine polynomial grid: the ODE solution to measure error against."""
    s = [float(v) for v in gits.polynomial(steps + 1, model.sigma_min, model.sigma_max)]
    x = x_T
    for i in range(steps):
        x = heun_step(model, x, s[i], s[i + 1])
    return x


@pytest.fixture(scope="module")
def mix(registry):
    return load_model("mixture", "cpu", registry=registry)


def rmse_of(registry, mix, sampler: str, schedule: Spec | None, nfe: int, ref, x_T) -> tuple[float, dict]:
    spec = CellSpec("mixture", Method(Spec.parse(sampler), schedule), nfe, num_samples=len(x_T), seed=10_000)
    solve = build(registry, spec, mix)
    out = solve.sample(range(len(x_T)))
    assert out.nfe == nfe  # the search is not in the budget
    return float((out.x0.double() - ref).pow(2).mean().sqrt()), solve.record()


@pytest.mark.parametrize(
    ("name", "sampler"),
    [("gits", "ipndm"), ("gits", "euler"), ("ld3", "ipndm"), ("ld3", "dpm++2m"), ("ld3", "unipc")],
)
def test_searched_beats_the_default_schedule(registry, mix, name, sampler):
    """At 5 NFE, on noise the search never saw (another seed block), the searched steps are
    closer to the ODE solution than the sampler's default steps, for the search solver; the
    search's calls are counted apart from the budget. (GITS's first-order cost is the same
    for every solver and does not beat log-SNR for DPM-Solver++ here: README.)"""
    x_T = SampleNoise(10_000, torch.arange(64), mix.shape, torch.device("cpu"))() * mix.sigma_max
    ref = reference(mix, x_T.double())
    base, _ = rmse_of(registry, mix, sampler, None, 5, ref, x_T)
    err, record = rmse_of(registry, mix, sampler, spec_of(name, TINY[name]), 5, ref, x_T)
    assert err < base, (err, base)
    assert record["schedule_fit_nfe"] > 0 and record["schedule_fit_s"] > 0
    assert record["schedule_fitted"]["search_solver"] == sampler
    assert record["schedule_fitted"]["source"] == "searched"


def test_dmn_lowers_its_bound_without_network_calls(registry, mix):
    """DMN's steps have a lower error bound than uniform log-SNR and cost no network call."""
    spec = CellSpec("mixture", Method(Spec.parse("dpm++2m"), spec_of("dmn", TINY["dmn"])), 6)
    record = build(registry, spec, mix).record()
    assert record["schedule_fit_nfe"] == 0
    fitted = record["schedule_fitted"]
    assert fitted["objective"] < fitted["objective_logsnr"]
    orders = [1, 2, 2, 2, 2, 1]
    sigmas = torch.tensor(record["sigmas"], dtype=torch.float64)
    assert dmn.objective(sigmas, orders, 1.0, -1) < dmn.objective(
        ld3.schedule(torch.zeros(6, dtype=torch.float64), 0.002, 80.0), orders, 1.0, -1
    )


def test_dmn_weights_integrate_exactly():
    """J_j against quadrature: the Lagrange basis integrated against e^lambda."""
    lam = torch.tensor([-4.0, -2.5, -1.0, 0.7], dtype=torch.float64)
    for s, k in [(0, 1), (1, 2), (2, 3)]:
        J = dmn.weights(lam, s, k)
        u = torch.linspace(float(lam[s]), float(lam[s + 1]), 20001, dtype=torch.float64)
        nodes = lam[s - k + 1 : s + 1]
        for j in range(k):
            basis = torch.ones_like(u)
            for m in range(k):
                if m != j:
                    basis = basis * (u - nodes[m]) / (nodes[j] - nodes[m])
            assert float(J[j]) == pytest.approx(float(torch.trapezoid(torch.exp(u) * basis, u)), rel=1e-6)


# --- The cache ----------------------------------------------------------------------------


def test_cache_round_trip_and_invalidation(registry, mix, cache):
    method = Method(Spec.parse("ipndm"), spec_of("gits", TINY["gits"]))
    first = build(registry, CellSpec("mixture", method, 5), mix)
    again = build(registry, CellSpec("mixture", method, 5), mix)
    assert again.prep["schedule_fitted"]["source"] == "cache" and again.prep["schedule_fit_nfe"] == 0
    assert torch.equal(first.sigmas, again.sigmas)
    entry = cache / first.prep["schedule_fitted"]["file"]
    # The key follows the model, the steps, the search solver and the search options
    names = {first.prep["schedule_fitted"]["file"]}
    other = mixture(shape=(1, 8, 8), seed=3)
    other.spec = "mixture"
    for model, m in [
        (other, method),
        (mix, Method(Spec.parse("dpm++2m"), method.schedule)),
        (mix, Method(Spec.parse("ipndm"), spec_of("gits", {**TINY["gits"], "coeff": 1.0}))),
    ]:
        names.add(build(registry, CellSpec("mixture", m, 5), model).prep["schedule_fitted"]["file"])
    names.add(build(registry, CellSpec("mixture", method, 6), mix).prep["schedule_fitted"]["file"])
    assert len(names) == 5
    # A corrupt or stale entry is searched again, never trusted
    entry.write_text("{not json")
    redo = build(registry, CellSpec("mixture", method, 5), mix)
    assert redo.prep["schedule_fitted"]["source"] == "searched (cache entry corrupt)"
    stored = json.loads(entry.read_text())
    stored["key"]["steps"] = 99
    entry.write_text(json.dumps(stored))
    redo = build(registry, CellSpec("mixture", method, 5), mix)
    assert redo.prep["schedule_fitted"]["source"] == "searched (cache entry stale)"
    assert torch.equal(redo.sigmas, first.sigmas)  # deterministic


def test_committed_schedules_are_found(registry):
    """Every committed schedule matches the shipped weights of its model (digits, mnist): a run
    loads it; every featured pairing of digits and mnist is committed."""
    models = {name: load_model(name, "cpu", registry=registry) for name in ("digits", "mnist")}
    files = sorted(ls_cache.PACKAGED.glob("*.json"))
    assert files, "no committed schedules"
    for path in files:
        key = json.loads(path.read_text())["key"]
        assert key["fingerprint"] == bench.fingerprint(models[key["model"]]), path.name
    for (name, sampler), nfe in itertools.product(
            [("gits", "ipndm"), ("gits", "unipc"), ("dmn", "unipc"), ("dmn", "dpm++2m"), ("ld3", "unipc"),
             ("ld3", "dpm++2m"), ("ld3", "ipndm")], [5, 10, 20]):
        spec = CellSpec("mnist", Method(Spec.parse(sampler), Spec.parse(name)), nfe)
        solve = build(registry, spec, models["mnist"])
        assert solve.prep["schedule_fitted"]["source"] == "packaged", (name, sampler, nfe)
    digits = models["digits"]
    cells = [*itertools.product(["gits", "dmn", "ld3", "ld3:start=search"], ["ipndm", "dpm++2m", "unipc"],
                                [5, 10, 20])]
    for name, sampler, nfe in cells:
        spec = CellSpec("digits", Method(Spec.parse(sampler), Spec.parse(name)), nfe)
        solve = build(registry, spec, digits)
        assert solve.prep["schedule_fitted"]["source"] == "packaged", (name, sampler, nfe)
        assert solve.prep["schedule_fit_nfe"] == 0
        assert len(solve.sigmas) == nfe + 1
        top = float(solve.sigmas[0])
        assert top == pytest.approx(80.0) if "start" not in name else 0.5 < top <= 80.0


def test_samplers_all_runs_the_featured_pairings(registry):
    """`--samplers all` on the default schedule adds each schedule's featured pairings (all
    committed for digits above); an explicit --schedule runs only what it names."""
    pairs = {(m.sampler.name, m.schedule.name if m.schedule else None)
             for m in methods_from(registry, "all", "default", "none")}
    featured = {(s, name) for name, sampled in FEATURED.items() for s in sampled}
    assert featured <= pairs and ("unipc", None) in pairs
    assert all(m.schedule == Spec("karras") for m in methods_from(registry, "all", "karras", "none"))


# --- Estimates, errors ----------------------------------------------------------------------


def test_estimate_names_the_calls_the_search_makes(tmp_path, capsys):
    """The estimate a run says before the cell is the calls its search then makes; none once
    cached (a second run into another directory finds the search done)."""
    schedule = str(spec_of("ld3", TINY["ld3"]))

    def run(out):
        """(the cell's record, the lines the run said of a fit stage)."""
        argv = ["run", "--model", "mixture", "--samplers", "ipndm", "--schedule", schedule, "--nfe", "4",
                "--num-samples", "8", "--batch-size", "8", "--out", str(out), "--report", "csv"]
        assert main(argv) == 0
        said = [line for line in capsys.readouterr().err.splitlines() if "network calls" in line]
        (record,) = bench.Run.open(out).records
        return record, said

    record, (line,) = run(tmp_path / "a")
    assert line.startswith(f"ipndm @{schedule} @ NFE 4: ") and record["schedule_fit_nfe"] > 0
    assert f"about {record['schedule_fit_nfe']} network calls" in line
    again, said = run(tmp_path / "b")
    assert said == [] and again["schedule_fit_nfe"] == 0


def test_a_searched_schedule_needs_its_cell(registry, mix):
    """The recipe leaves a searched schedule's sigmas to bench.build, which searches them for
    the cell; its options are checked before that."""
    recipe = resolve(registry, CellSpec("mixture", Method(Spec("ipndm"), Spec("gits")), 5), mix)
    assert recipe.searched and recipe.sigmas is None
    with pytest.raises(UsageError, match="metric"):
        resolve(registry, CellSpec("mixture", Method(Spec("ipndm"), Spec.parse("gits:metric=l3")), 5), mix)


def test_bad_options_exit_2(tmp_path, capsys):
    code = main(
        [
            "run",
            "--model",
            "mixture",
            "--samplers",
            "ipndm",
            "--schedule",
            "gits:metric=l3",
            "--nfe",
            "5",
            "--num-samples",
            "8",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "metric" in capsys.readouterr().err
    code = main(
        [
            "run",
            "--model",
            "mixture",
            "--samplers",
            "ipndm",
            "--schedule",
            "ld3:solver=heun",
            "--nfe",
            "5",
            "--num-samples",
            "8",
            "--out",
            str(tmp_path / "s"),
            "--quiet",
        ]
    )
    assert code == 2


# --- The searched start (ld3:start=search) ---------------------------------------------------


def test_ld3_searches_its_start(registry, mix):
    """start=search learns the first sigma: below sigma_max after a fit on the mixture, and
    closer to the ODE solution from sigma_max eps (the teacher's start) than the same search
    at start=sigma_max, on noise the search never saw; the record's sigmas start there."""
    x_T = SampleNoise(10_000, torch.arange(64), mix.shape, torch.device("cpu"))() * mix.sigma_max
    ref = reference(mix, x_T.double())
    fixed, _ = rmse_of(registry, mix, "dpm++2m", spec_of("ld3", TINY["ld3"]), 5, ref, x_T)
    learned, record = rmse_of(
        registry, mix, "dpm++2m", spec_of("ld3", {**TINY["ld3"], "start": "search"}), 5, ref, x_T
    )
    start = record["schedule_fitted"]["start"]
    print(f"\nld3 start=search on the mixture: start {start:.3g}, RMSE to the teacher {learned:.3g} "
          f"(start=sigma_max: {fixed:.3g})")
    assert start < 0.9 * mix.sigma_max and record["sigmas"][0] == pytest.approx(start, rel=1e-6)
    assert learned < fixed, (learned, fixed)


def test_start_is_in_the_cache_key(registry, mix):
    """The start is part of the key (20 and 20.0 are one key); start=sigma_max keeps the key of
    the searches before the option existed, so the committed fits stay valid."""
    names = set()
    for start in ("sigma_max", "search", "20", "20.0"):
        for method in ("ld3", "dmn") if start != "search" else ("ld3",):
            spec = spec_of(method, {**TINY[method], "start": start})
            cell = CellSpec("mixture", Method(Spec.parse("dpm++2m"), spec), 4)
            record = build(registry, cell, mix).record()
            value = start if start[0].isalpha() else float(start)
            names.add((method, value, record["schedule_fitted"]["file"]))
            if start.startswith("20"):
                assert record["sigmas"][0] == pytest.approx(20.0)
    assert len({n for _, _, n in names}) == len({(m, s) for m, s, _ in names}) == 5
    assert "start" not in ld3.LD3Options().to_json() and "start_lr" not in ld3.LD3Options().to_json()
    assert ld3.LD3Options(start="search").to_json()["start"] == "search"


@pytest.mark.parametrize("schedule", ["ld3:start=high", "ld3:start=500", "ld3:start=-1", "dmn:start=search"])
def test_bad_start_exits_2_with_one_line(tmp_path, capsys, schedule):
    args = ["run", "--model", "mixture", "--samplers", "dpm++2m", "--schedule", schedule, "--nfe", "5"]
    code = main([*args, "--num-samples", "8", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "start" in err and len(err.splitlines()) == 1, err
