"""One cell, one path: CellSpec identity, build() shared by the runner and the conformance
kit, prepare on the modified model, the Python API, and plugins on the public API only."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import bench
import bench.analysis
import bench.reporters.text
from bench import CellSpec, Method, Spec
from bench.cli import main
from bench.compare import compare_cell, tolerances_from_json
from bench.metrics.reference import reference_solve
from bench.plugins import load_registry
from bench.runner import RunConfig, run
from bench.testing import Case, solve

ROOT = Path(__file__).parents[1]


def record(spec: CellSpec, rmse: float, version: str = "bench-classic==0.1.0") -> dict:
    """A finished cell's record as the runner writes it, with one metric."""
    return {"spec": spec.identity(), "model": spec.model, "method": str(spec.method.sampler), "nfe": spec.nfe,
            "status": "ok", "versions": {"sampler": version}, "num_samples": spec.num_samples,
            "metrics": {"rmse": {"value": rmse, "std": 1e-4, "n": spec.num_samples}}}


def test_cell_identity_decides_comparability():
    rmse = (("rmse", "sampler-bench==0.1.0"),)
    spec = CellSpec("mixture", Method(Spec("euler"), Spec("karras")), 5, metrics=rmse)
    tol = tolerances_from_json(None)
    # The id is a hash of the identity, stable and sensitive to each field
    assert spec.id == CellSpec("mixture", Method(Spec("euler"), Spec("karras")), 5, metrics=rmse).id
    assert spec.id != dataclasses.replace(spec, nfe=6).id
    # A changed reference or metric version: not comparable, never a regression
    other_ref = CellSpec(**{**spec.__dict__, "metric_options": (("ref_stats", "other.npz"),)})
    other_metric = CellSpec(**{**spec.__dict__, "metrics": (("rmse", "sampler-bench==0.2.0"),)})
    for head, why in ((other_ref, "metric_options"), (other_metric, "metric rmse")):
        cell = compare_cell(record(spec, 0.1), record(head, 0.5), tol, 0.05)
        assert cell.verdict == "not comparable" and why in cell.reason and head.id != spec.id
    # A sampler version bump alone is compared: the regression is caught and named
    cell = compare_cell(record(spec, 0.1), record(spec, 0.5, "bench-classic==0.2.0"), tol, 0.05)
    assert cell.verdict == "worse" and "bench-classic==0.2.0" in cell.changes[0].note
    # Options in another order are the same cell
    a = CellSpec("m", Method(Spec.parse("heun:afs=auto:churn=0")), 5)
    b = CellSpec("m", Method(Spec.parse("heun:churn=0:afs=auto")), 5)
    assert a.id == b.id


def test_runner_and_testing_share_build(tmp_path):
    """The runner's number for a cell is the number of bench.build's samples, and the
    conformance kit samples the very same values."""
    registry = bench.registry()
    config = RunConfig(models=["mixture"], methods=[Method(Spec("heun"))], nfe=[6], num_samples=16,
                       batch_size=16, metrics=["reference"], out=tmp_path)
    out, records = run(registry, config)
    model = bench.load_model("mixture", registry=registry)
    spec = CellSpec("mixture", Method(Spec("heun")), 6, num_samples=16)
    s = bench.build(registry, spec, model).sample(range(16))
    # The analytic mixture's reference: RK4 in log sigma down to sigma_min, 128 steps (auto)
    ref = reference_solve(model, s.eps.double() * model.sigma_max, model.sigma_max, model.sigma_min, 128)
    rmse = (s.x0.double() - ref).reshape(16, -1).pow(2).mean(1).sqrt().mean()
    assert float(rmse) == pytest.approx(records[0]["metrics"]["reference_rmse"]["value"], rel=1e-5)
    assert s.nfe == 6 == records[0]["nfe_counted"]
    # bench.testing draws the same samples through the same build
    case = Case.of("heun", model=model)
    assert torch.equal(solve(case, 6, range(16)).x0, s.x0)


PREPARE_PLUGIN = """
import bench
from bench import Plan, Sampler
from bench.solvers import euler_step

def prepare(model, sigmas, options):
    return {"seen_shape": "x".join(map(str, model.shape)), "seen": type(model).__name__}

def sample(model, x, sigmas, *, noise=None, callback=None, **_):
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x = euler_step(model, x, s[i], s[i + 1])
    return x

@bench.hookimpl
def register_samplers(register):
    register(Sampler("t-prepared", sample, lambda nfe, o: Plan(nfe, nfe, to_zero=False), "NFE = steps",
                     "a sampler with a prepare stage", prepare=prepare))
"""


def test_prepare_sees_the_model_it_will_sample(plugin_site, tmp_path):
    plugin_site("bench-prepared", PREPARE_PLUGIN)
    registry = load_registry()
    model = bench.load_model("digits", registry=registry)
    method = Method(Spec("t-prepared"), Spec("karras"), (Spec.parse("upsample-guidance:m=2"),))
    solve = bench.build(registry, CellSpec("digits", method, 3), model)
    # prepare got the guided 2x model on top of the counter, as sample() does
    assert solve.prep["prepared"] == {"seen_shape": "1x16x16", "seen": "UpsampleGuided"}
    assert solve.model is not solve.counter and tuple(solve.model.shape) == (1, 16, 16)
    # Its calls were counted apart from the budget, and the budget is whole for sampling
    out = solve.sample(range(2))
    assert out.nfe == 3 and solve.prep["prepare_nfe"] == 0


def test_python_api_matches_the_command_line(tmp_path, capsys):
    args = dict(samplers="euler,dpm++2m", nfe="3,5", model="mixture", num_samples=24, batch_size=12)
    frame = bench.run(**args, out=tmp_path / "api", report="csv")
    assert main(["run", "--samplers", "euler,dpm++2m", "--nfe", "3,5", "--model", "mixture",
                 "--num-samples", "24", "--batch-size", "12", "--out", str(tmp_path / "cli"),
                 "--report", "csv", "--quiet"]) == 0
    capsys.readouterr()
    cli = pd.read_csv(tmp_path / "cli" / "results.csv")
    assert list(frame.columns) == list(cli.columns)
    for col in ("method", "nfe", "nfe_counted", "status"):
        assert frame[col].astype(str).tolist() == cli[col].astype(str).tolist()
    for col in ("fd", "reference_rmse", "reference_rmse_std"):
        assert frame[col].tolist() == pytest.approx(cli[col].tolist(), rel=1e-12)
    # The run directory rides along, and bench.load reads the same frame back
    assert frame.attrs["run_dir"] == tmp_path / "api"
    pd.testing.assert_frame_equal(bench.load(tmp_path / "api"), frame)
    with pytest.raises(bench.UsageError, match="unknown option"):
        bench.run(num_sample=3)


def test_duplicate_cells_run_once(tmp_path):
    """`--schedule karras,default` for euler (whose default is karras) is one cell."""
    registry = bench.registry()
    methods = [Method(Spec("euler"), Spec("karras")), Method(Spec("euler"))]
    config = RunConfig(models=["mixture"], methods=methods, nfe=[3], num_samples=8, batch_size=8,
                       out=tmp_path)
    _, records = run(registry, config)
    assert len(records) == 1


# What a first-party plugin (its package, tests, benchmarks and scripts) and the repository's
# benchmarks may import of the host: `bench` (its __all__), these modules, and `main` of bench.cli
PUBLIC_MODULES = {"bench.solvers", "bench.testing", "bench.errors", "bench.adapters", "bench.stats"}
PUBLIC_FROM = {"bench.cli": {"main"}}


def host_internals(path: Path, root: Path = ROOT) -> list[str]:
    """What the file uses of the host beyond its public API: `import bench.x`, `from bench.x
    import y`, `from bench import y` and `bench.y` (where `bench` is the imported package)."""
    tree = ast.parse(path.read_text())
    public_names = set(bench.__all__) | {m.split(".")[1] for m in PUBLIC_MODULES}
    aliases, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "bench":
                    aliases.add(alias.asname or "bench")
                elif alias.name.startswith("bench.") and alias.name not in PUBLIC_MODULES:
                    bad.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {alias.name for alias in node.names}
            if node.module == "bench":
                bad += [f"from bench import {n}" for n in sorted(names - public_names)]
            elif node.module in PUBLIC_FROM:
                bad += [f"from {node.module} import {n}" for n in sorted(names - PUBLIC_FROM[node.module])]
            elif node.module.startswith("bench.") and node.module not in PUBLIC_MODULES:
                bad.append(f"from {node.module} import {', '.join(sorted(names))}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in public_names):
            bad.append(f"bench.{node.attr}")
    return [f"{path.relative_to(root)}: {b}" for b in bad]


def test_plugins_import_only_the_public_api():
    """No first-party plugin uses host internals (bench.runner, bench.cell, ...) in its package,
    its tests, benchmarks or scripts, and no plugin package imports another plugin's package:
    a third party can write each of them against the public API. The repository's benchmarks
    hold to the same API."""
    packages = {p.name: p for p in (ROOT / "plugins").glob("*/bench_*") if p.is_dir()}
    assert {"bench_classic", "bench_amed", "bench_skip_tuning", "bench_upsample_guidance"} <= set(packages)
    bad = []
    for name, package in packages.items():
        for path in package.rglob("*.py"):
            bad += host_internals(path)
            for node in ast.walk(ast.parse(path.read_text())):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                bad += [f"{path.relative_to(ROOT)}: {m}" for m in modules
                        if m.split(".")[0] in packages and m.split(".")[0] != name]
    others = [p for d in ("tests", "benchmarks", "scripts") for p in ROOT.glob(f"plugins/*/{d}/**/*.py")]
    others += list((ROOT / "benchmarks").rglob("*.py"))
    assert len(others) > 30 and any("scripts" in p.parts for p in others)
    for path in others:
        bad += host_internals(path)
    assert not bad, "host internals used: " + ", ".join(bad)


def test_the_public_api_check_catches_internals(tmp_path):
    """The check above sees each way of reaching an internal, and passes the public API."""
    sample = tmp_path / "sample.py"
    sample.write_text("import bench\nimport bench.cell\nfrom bench import cli, Spec\nfrom bench.cli import "
                      "main, build_parser\nfrom bench.runner import run\nfrom bench.testing import mixture\n"
                      "from bench.adapters import Flow\nbench.models.gaussian()\nbench.resolve\n")
    assert [f.split(": ", 1)[1] for f in host_internals(sample, tmp_path)] == [
        "import bench.cell", "from bench import cli", "from bench.cli import build_parser",
        "from bench.runner import run", "bench.models"]


def test_public_names_resolve():
    for name in bench.__all__:
        assert getattr(bench, name) is not None, name
    identity = CellSpec("m", Method(Spec("euler")), 5).identity()
    assert json.loads(json.dumps(copy.deepcopy(identity))) == identity  # plain JSON, stored as is


def test_seed_blocks_are_disjoint_and_explicit_ranges_work():
    from bench.config import config_from

    registry = bench.registry()
    blocks = [config_from(registry, model="mixture", samplers="euler", num_samples=256, seed=k)
              for k in (0, 1, 2)]
    ranges = [set(range(c.seed, c.seed + c.num_samples)) for c in blocks]
    assert [c.seed for c in blocks] == [0, 256, 512] and not (ranges[0] & ranges[1] or ranges[1] & ranges[2])
    explicit = config_from(registry, model="mixture", samplers="euler", seeds="1000-1049")
    assert (explicit.seed, explicit.num_samples) == (1000, 50)
    for bad in ({"seeds": "9-3"}, {"seeds": "²-4"}, {"seed": -1}, {"seed": 10**30}, {"threads": 0},
                {"seeds": "0-9", "num_samples": 5}):
        with pytest.raises(bench.UsageError):
            config_from(registry, model="mixture", samplers="euler", **bad)
    # A block's samples are the same samples wherever they are drawn: block 1 of 8 is seeds 8..15
    model = bench.load_model("mixture", registry=registry)
    one = bench.build(registry, CellSpec("mixture", Method(Spec("euler")), 4, num_samples=8, seed=8), model)
    wide = bench.build(registry, CellSpec("mixture", Method(Spec("euler")), 4, num_samples=16, seed=0), model)
    assert torch.equal(one.sample(range(8)).x0, wide.sample(range(8, 16)).x0)


def test_a_run_directory_holds_one_sweep(tmp_path, capsys):
    base = ["run", "--model", "mixture", "--samplers", "euler", "--nfe", "3", "--out", str(tmp_path / "r"),
            "--report", "csv", "--quiet"]
    assert main([*base, "--num-samples", "8"]) == 0
    assert main([*base, "--num-samples", "8"]) == 0  # the same sweep again: it resumes
    capsys.readouterr()
    assert main([*base, "--num-samples", "16"]) == 2
    err = capsys.readouterr().err
    assert "holds another sweep" in err and "num_samples: 8 there, 16 now" in err
    assert len(err.splitlines()) == 1
    assert len(pd.read_csv(tmp_path / "r" / "results.csv")) == 1


def test_paired_verdicts(tmp_path):
    """Same samples under two names are tied (a zero interval); on the analytic Gaussian at 20
    NFE euler (20 steps) and heun (10 steps) differ significantly in their error to the exact
    ODE solution (its closed form at sigma_min: `reference`, paired). Euler is the closer one
    there: the Gaussian's small variances make the last steps stiff, where Heun's halved step
    count costs more than its order gains."""
    frame = bench.run(model="gaussian", samplers="euler,euler:s_noise=1,heun", nfe=20, num_samples=64,
                      metrics="reference,fd", out=tmp_path / "v", report="verdict,markdown")
    assert (frame["status"] == "ok").all()
    data = json.loads((tmp_path / "v" / "verdict.json").read_text())
    rmse = next(v for v in data["verdicts"] if v["metric"] == "reference_rmse" and v["nfe"] == 20)
    assert rmse["best"] in ("euler", "euler:s_noise=1") and rmse["worse"] == ["heun"]
    assert rmse["methods"]["heun"]["interval"][0] > 0  # significantly worse, paired
    # A method against itself: identical replicates, a tie with a zero interval
    twins = next(v for v in bench.analysis.verdicts(bench.Run.open(tmp_path / "v")) if v["metric"] == "fd")
    a, b = twins["methods"]["euler"], twins["methods"]["euler:s_noise=1"]
    assert a["point"] == b["point"] and {a["status"], b["status"]} <= {"best", "tied"}
    from bench.stats import paired_interval
    with np.load(tmp_path / "v" / frame_replicates(tmp_path / "v", "euler")) as x, \
         np.load(tmp_path / "v" / frame_replicates(tmp_path / "v", "euler:s_noise=1")) as y:
        assert paired_interval(x["fd"], y["fd"]) == (0.0, 0.0)
    report = (tmp_path / "v" / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## RMSE to reference")  # the verdict comes first


def frame_replicates(run_dir: Path, method: str) -> str:
    return next(r["replicates"] for r in bench.Run.open(run_dir).records if r["method"] == method)


def test_hostile_records_read_nothing_outside_the_run(tmp_path, capsys):
    """A record's grid naming a file outside the run directory is not embedded, and a
    sampler option with markup reaches report.md as text."""
    run = tmp_path / "r"
    assert main(["run", "--model", "mixture", "--samplers", "euler", "--nfe", "3", "--num-samples", "8",
                 "--out", str(run), "--report", "csv", "--quiet"]) == 0
    lines = (run / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    record.update(grid=str(secret), method="euler <script>alert(1)</script>")
    (run / "results.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["report", str(run), "--report", "markdown,html"]) == 0
    capsys.readouterr()
    import base64
    assert base64.b64encode(secret.read_bytes()).decode() not in (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md


def test_the_floor_is_real_data_at_the_same_n(tmp_path):
    """Records carry what real data scores at their n (fd of draws from the mixture itself);
    samplers are above it, and the tables and verdict show it."""
    bench.run(model="mixture", samplers="euler", nfe=[3, 40], num_samples=128, metrics="fd,reference",
              out=tmp_path / "f", report="verdict,markdown")
    records = bench.Run.open(tmp_path / "f").records
    floor = records[0]["floor"]
    assert set(floor) == {"fd"} and floor["fd"]["n"] == 128  # reference has no floor
    assert floor["fd"] == records[1]["floor"]["fd"]  # computed once, the same for every cell
    euler3 = records[0]["metrics"]["fd"]
    assert euler3["value"] > floor["fd"]["value"] + 2 * euler3["std"]
    assert "real data (floor)" in (tmp_path / "f" / "report.md").read_text()
    verdict = json.loads((tmp_path / "f" / "verdict.json").read_text())["verdicts"]
    assert all(v["floor"] == floor["fd"] for v in verdict if v["metric"] == "fd")


def test_compare_uses_paired_intervals_when_both_runs_carry_replicates(tmp_path, capsys):
    args = ["run", "--model", "mixture", "--samplers", "euler", "--nfe", "3", "--num-samples", "64",
            "--metrics", "fd", "--report", "csv", "--quiet", "--out"]
    assert main([*args, str(tmp_path / "a")]) == 0 and main([*args, str(tmp_path / "b")]) == 0
    # The head's fd and its replicates 1.5x: a paired interval far from 0
    head = tmp_path / "b"
    record = json.loads((head / "results.jsonl").read_text())
    record["metrics"]["fd"]["value"] *= 1.5
    with np.load(head / record["replicates"]) as data:
        np.savez(head / record["replicates"], fd=data["fd"] * 1.5)
    (head / "results.jsonl").write_text(json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(head)]) == 0
    out = capsys.readouterr().out
    assert "worse" in out and "paired interval of head - base" in out


def test_repeats_are_disjoint_seed_blocks_reported_as_mean_sd_and_best(tmp_path):
    frame = bench.run(model="mixture", samplers="euler", nfe=4, num_samples=16, seed=2, repeats=3,
                      metrics="fd", out=tmp_path / "r", report="markdown")
    assert sorted(frame["seed"]) == [32, 48, 64]  # blocks 2, 3, 4 of 16 seeds
    values = frame["fd"].tolist()
    md = (tmp_path / "r" / "report.md").read_text()
    mean, best = sum(values) / 3, min(values)
    assert "3 blocks" in md and f"best {bench.reporters.text.fmt(best)}" in md
    assert bench.analysis.pool(bench.Run.open(tmp_path / "r").records)[0]["metrics"]["fd"]["value"] == \
        pytest.approx(mean)


def test_a_baseline_never_grants_trust_to_pickles(tmp_path, capsys):
    """`bench check` replays a baseline's stored options, but never --trust-pickle: only the
    person's own command line can switch on code-running pickle loading."""
    from bench.compare import load, write_baseline

    assert main(["run", "--model", "mixture", "--samplers", "euler", "--nfe", "3", "--num-samples", "8",
                 "--out", str(tmp_path / "r"), "--report", "csv", "--quiet"]) == 0
    options = {"model": "mixture", "samplers": "euler", "nfe": "3", "num_samples": 8, "trust_pickle": True}
    baseline = write_baseline(load(tmp_path / "r"), tmp_path / "b.json", options)
    capsys.readouterr()
    assert main(["check", "--baseline", str(baseline), "--out", str(tmp_path / "re")]) == 0
    err = capsys.readouterr().err
    assert "running: bench run" in err and "--trust-pickle" not in err


@pytest.mark.parametrize("argv", [["--nfe", "²"], ["--shard", "²/4"], ["--device", "mps"],
                                  ["--seed", str(10**30)], ["--seeds", "5-2"], ["--threads", "0"],
                                  ["--repeats", "0"]])
def test_bad_run_input_is_one_line_exit_2(argv, tmp_path, capsys):
    code = main(["run", "--model", "mixture", "--samplers", "euler", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
