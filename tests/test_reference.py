"""The reference-error metric (a converged solve of the model's own ODE from the same noise),
the default metric set, metrics that cannot score a model, rmse on float32 networks and
--save-samples, on real files: a 28x28 factory network loaded from a prefixed .pt, the
analytic Gaussian (whose ODE has a closed form) and the shipped digits UNet."""

from __future__ import annotations

import json
import runpy

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench import CellSpec, Method, Spec, build
from bench.cell import load_model
from bench.cli import main
from bench.contracts import Batch, MetricContext
from bench.errors import UsageError
from bench.images import to_uint8_nhwc
from bench.metrics.reference import SHIPPED, References, cache_dir
from bench.models.analytic import gaussian, mixture
from bench.plugins import load_registry
from bench.seeding import SampleNoise
from bench.testing import random_unet

FACTORY = '''
import torch
from torch import nn


class Net(nn.Module):
    """F(x_in, c_noise): two 3x3 convolutions with the noise level added between them."""

    def __init__(self):
        super().__init__()
        self.a, self.t = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(1, 8)
        self.b = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, c_noise, **cond):
        h = self.a(x) + self.t(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        return self.b(torch.tanh(h))


def build():
    return {"net": Net(), "shape": (1, 28, 28), "kind": "edm"}
'''
N = 16


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def bench_cache(tmp_path_factory, monkeypatch):
    """$BENCH_CACHE for this module's tests: one directory, so reference solves are shared."""
    root = tmp_path_factory.getbasetemp() / "bench-cache"
    monkeypatch.setenv("BENCH_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def factory_spec(tmp_path_factory):
    """A 28x28 EDM-preconditioned network: its factory file and random weights saved as a
    torch state dict under the prefix `network.` (as a training script's wrapper saves them)."""
    root = tmp_path_factory.mktemp("factory")
    (root / "tiny28.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = runpy.run_path(str(root / "tiny28.py"))["Net"]()
    torch.save({f"network.{k}": v for k, v in net.state_dict().items()}, root / "net.pt")
    return f"factory:{root / 'tiny28.py'}:build;weights={root / 'net.pt'};strip_prefix=network."


def bench_run(out, *args: str) -> int:
    return main(["run", "--quiet", "--report", "csv", "--out", str(out), *args])


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory, factory_spec, bench_cache_root):
    """euler at 5, 10, 20 NFE on the factory model, scored by `reference` (a 1x28x28 model's
    default is fid-mnist and kid-mnist, tests/test_mnist_metrics.py): its records."""
    out = tmp_path_factory.mktemp("factory-run") / "run"
    args = ["--model", factory_spec, "--samplers", "euler", "--nfe", "5,10,20", "--num-samples", str(N),
            "--batch-size", str(N), "--metrics", "reference"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE", str(bench_cache_root))
        assert bench_run(out, *args) == 0
    return {r["nfe"]: r for r in records(out)}


@pytest.fixture(scope="module")
def bench_cache_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "bench-cache"


def test_a_28x28_factory_model_from_a_prefixed_pt_gets_the_reference_error_and_it_falls_with_nfe(
        factory_run, bench_cache_root):
    cells = factory_run
    assert [cells[k]["status"] for k in (5, 10, 20)] == ["ok"] * 3
    for nfe, r in cells.items():
        assert list(r["spec"]["metrics"]) == ["reference"] and r["metric_set"] == "named by --metrics"
        assert r["nfe_counted"] == nfe  # the reference solve's calls are in no cell's budget
    rmse = {k: cells[k]["metrics"]["reference_rmse"] for k in (5, 10, 20)}
    psnr = {k: cells[k]["metrics"]["reference_psnr"] for k in (5, 10, 20)}
    print("\nreference RMSE, euler:", {k: f"{v['value']:.4g} ± {v['std']:.2g}" for k, v in rmse.items()})
    # The error falls with the budget, each step by more than three standard errors
    for a, b in ((5, 10), (10, 20)):
        assert rmse[a]["value"] - rmse[b]["value"] > 3 * (rmse[a]["std"] + rmse[b]["std"])
        assert psnr[b]["value"] > psnr[a]["value"] and psnr[a]["higher_is_better"]
    assert {v["n"] for v in rmse.values()} == {N}
    # Solved once (its seconds recorded apart), then taken from memory by the other cells
    info = {k: cells[k]["metric_info"]["reference"] for k in (5, 10, 20)}
    assert (info[5]["solved"], info[5]["cached"]) == (N, 0) and info[5]["reference_s"] > 0
    for k in (10, 20):
        assert (info[k]["solved"], info[k]["cached"], info[k]["reference_s"]) == (0, N, 0.0)
    assert "heun" in info[5]["solver"] and "float32" in info[5]["solver"]
    # The reference's own error (N against 2N steps) is far below the smallest error it measures
    assert 0 < info[5]["gap"] < rmse[20]["value"] / 20 and info[5]["check_steps"] == 256
    # On disk, in the network's precision, under the key the record names
    files = list((bench_cache_root / "reference").glob(f"{info[5]['key']}-*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor("x0").dtype == torch.float32 and f.get_tensor("x0").shape == (N, 1, 28, 28)
    # The replicates are stored for paired comparisons
    assert "replicates" in cells[5]


def test_the_reference_matches_the_closed_form_ode_solution():
    model = gaussian()
    ctx = MetricContext("gaussian", model, 8, 0, torch.device("cpu"), {}, {"reference_solver": "heun"})
    eps = SampleNoise(0, range(8), model.shape, "cpu")()
    errors = {}
    for steps in (32, 128):  # 128: the default
        refs = References(ctx, model.sigma_max, steps)
        ref = refs.solve(eps, torch.arange(8))
        exact = model.ode_solution(eps.double() * model.sigma_max, model.sigma_max, model.sigma_min)
        err = (ref - exact).reshape(8, -1).pow(2).mean(1).sqrt().mean()
        fine = refs.solve(eps, torch.arange(8), 2 * steps)
        gap = (ref - fine).reshape(8, -1).pow(2).mean(1).sqrt().mean()
        print(f"\nheun {steps} steps on gaussian: error {err:.3g}, gap to {2 * steps} steps {gap:.3g}")
        assert ref.dtype == torch.float64  # the analytic model computes in float64
        # Second order: the N-step error is about 4/3 of the N vs 2N gap (1.32-1.33 measured)
        assert 1.2 < float(err / gap) < 1.45
        errors[steps] = float(err)
    assert errors[128] < 5e-4 and 12 < errors[32] / errors[128] < 20  # 4x the steps, ~16x less error


def test_the_analytic_models_take_their_exact_or_rk4_reference_by_default():
    """The single Gaussian's reference is its closed form; the mixture's, RK4 in log sigma
    (4th order: 16x less error for 2x the steps); a network's, Heun."""
    eps = SampleNoise(0, range(8), (1, 8, 8), "cpu")()
    model = gaussian()
    exact = References(MetricContext("gaussian", model, 8, 0, torch.device("cpu"), {}), model.sigma_max, 128)
    assert exact.solver == "exact" and exact.key["steps"] == 0
    truth = model.ode_solution(eps.double() * model.sigma_max, model.sigma_max, model.sigma_min)
    assert torch.equal(exact.solve(eps, torch.arange(8)), truth)
    ctx = MetricContext("gaussian", model, 8, 0, torch.device("cpu"), {}, {"reference_solver": "rk4"})
    errors = {}
    for steps in (32, 64):
        rk4 = References(ctx, model.sigma_max, steps).solve(eps, torch.arange(8))
        errors[steps] = float((rk4 - truth).reshape(8, -1).pow(2).mean(1).sqrt().mean())
    print(f"\nrk4 on gaussian: error {errors[32]:.3g} at 32 steps, {errors[64]:.3g} at 64")
    assert errors[64] < 2e-5 and errors[32] / errors[64] > 10  # 4th order: about 16x
    mix = References(MetricContext("mixture", mixture(), 8, 0, torch.device("cpu"), {}), 80.0, 8)
    assert mix.solver == "rk4"
    net = References(MetricContext("r", random_unet(), 8, 0, torch.device("cpu"), {}), 80.0, 8)
    assert net.solver == "heun"
    with pytest.raises(UsageError, match="no closed-form solution"):
        References(MetricContext("mixture", mixture(), 8, 0, torch.device("cpu"), {},
                                 {"reference_solver": "exact"}), 80.0, 8)


def _feed(registry, ctx, eps, x0):
    state = registry.get("metrics", "reference").create(ctx)
    state.update(Batch(x0, eps, torch.arange(len(x0)), float(ctx.denoiser.sigma_max)))
    return state


def test_the_disk_cache_is_keyed_checked_and_refit(registry, bench_cache_root):
    model = gaussian(shape=(1, 4, 4), seed=3)
    eps = SampleNoise(0, range(5), model.shape, "cpu")()
    x0 = torch.zeros(5, *model.shape)

    def ctx(**options):
        options = {"reference_solver": "heun", **options}  # a solver with steps, keyed by them
        return MetricContext("gaussian:1x4x4", model, 5, 0, torch.device("cpu"), {}, options)

    first = _feed(registry, ctx(), eps, x0)
    value = first.result()["reference_rmse"].value
    path = next((bench_cache_root / "reference").glob(f"{first.info()['key']}-*.safetensors"))
    assert first.info()["solved"] == 5
    # A new run finds it on disk
    again = _feed(registry, ctx(), eps, x0)
    assert again.info()["cached"] == 5 and again.result()["reference_rmse"].value == value
    # Non-finite values, another key under the same name, or garbage: solved again, rewritten
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = json.loads(meta["key"]) | {"steps": 7}
    for bad in ({**tensors, "x0": tensors["x0"] * float("nan")}, None, b"not safetensors"):
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        elif bad is None:
            save_file(tensors, str(path), metadata={"key": json.dumps(other)})
        else:
            save_file(bad, str(path), metadata=meta)
        refit = _feed(registry, ctx(), eps, x0)
        assert refit.info()["solved"] == 5 and refit.result()["reference_rmse"].value == value
    # Another step count is another key
    assert _feed(registry, ctx(reference_steps="16"), eps, x0).info()["key"] != first.info()["key"]
    assert cache_dir() == bench_cache_root / "reference"


def test_rk4_runs_on_a_float32_network_and_rmse_names_the_reference(tmp_path):
    # The digits UNet computes in float32; the RK4 reference once fed it float64 and crashed.
    # `rmse`, the 0.2 name of the RK4 reference, is an alias of `reference` now
    out = tmp_path / "run"
    args = ["--model", "digits", "--samplers", "euler", "--nfe", "4", "--num-samples", "4",
            "--metrics", "rmse", "--metric-option", "reference_solver=rk4,reference_steps=16"]
    assert bench_run(out, *args) == 0
    (r,) = records(out)
    assert r["status"] == "ok" and 0 < r["metrics"]["reference_rmse"]["value"] < 1
    assert r["metric_info"]["reference"]["solver"].startswith("rk4, uniform in log sigma, 16 steps")
    assert r["metric_set"] == "named by --metrics"


@pytest.mark.parametrize(
    "model, metrics, extra, expected",
    [
        ("gaussian:1x28x28", "fid-digits", [], "side 8k, the model's are 1x28x28"),
        ("gaussian:4x8x8", "kid-digits", [], "the model's are 4x8x8"),
        ("gaussian:1x8x8", "pr-digits", ["--num-samples", "3"], "at least 4 samples"),
        ("digits", "fd", [], "known data moments"),
        ("gaussian:4x8x8", "fid-inception", [], "grey or RGB"),
        ("gaussian:1x8x8", "reference", ["--metric-option", "reference_steps=0"], "positive number"),
        ("gaussian:1x8x8", "reference", ["--metric-option", "nope=1"], "no metric reads 'nope'"),
        ("gaussian:1x8x8", "reference", ["--metric-option", "steps"], "not KEY=VALUE"),
    ],
)
def test_a_metric_that_cannot_score_the_model_stops_the_run_before_any_cell(
        tmp_path, capsys, model, metrics, extra, expected):
    out = tmp_path / "run"
    code = bench_run(out, "--model", model, "--samplers", "euler", "--nfe", "2", "--metrics", metrics, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (out / "results.jsonl").exists()


def test_save_samples_writes_each_cell_as_nhwc_uint8_in_sample_order(tmp_path, registry):
    out = tmp_path / "run"
    args = ["--model", "gaussian:3x8x6", "--samplers", "euler", "--nfe", "3", "--num-samples", "10",
            "--batch-size", "4", "--metrics", "fd", "--save-samples"]
    assert bench_run(out, *args) == 0
    (r,) = records(out)
    assert r["samples"] == f"samples/{r['cell_id']}.npz" and r["metric_set"] == "named by --metrics"
    with np.load(out / r["samples"]) as data:
        assert data.files == ["arr_0"]
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (10, 8, 6, 3)
    # The very samples of the cell, built by hand from its spec: row i is sample i
    model = load_model("gaussian:3x8x6", "cpu", registry)
    schedule = Spec.parse(registry.get("samplers", "euler").default_schedule)
    spec = CellSpec("gaussian:3x8x6", Method(Spec("euler"), schedule), 3, 10, 0)
    x0 = build(registry, spec, model).sample(range(10)).x0
    np.testing.assert_array_equal(images, to_uint8_nhwc(x0))
    assert not list((out / "samples").glob(".*"))  # no temporary file left


def test_the_models_own_metrics_are_recorded_as_such(tmp_path):
    out = tmp_path / "run"
    assert bench_run(out, "--model", "gaussian:1x4x4", "--samplers", "euler", "--nfe", "2",
                     "--num-samples", "8") == 0
    (r,) = records(out)
    assert r["metric_set"] == "the own metrics of model source 'gaussian'" and set(r["spec"]["metrics"]) == {
        "fd", "reference"}


def test_a_stochastic_cell_is_not_scored_by_the_reference(tmp_path, capsys):
    """A sampler that draws fresh noise with its options (euler-ancestral; euler with churn) is
    no convergence error of the ODE: its record says the reference does not apply, the table
    says n/a, and the verdict ranks it on the data metric only; each verdict says which
    question its metric answers."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", "--model", "mixture", "--samplers", "euler,euler-ancestral,euler:churn=5",
                 "--nfe", "8", "--num-samples", "32", "--metrics", "fd,reference", "--out", str(out),
                 "--report", "console,verdict"]) == 0
    console = capsys.readouterr().out
    by = {r["sampler"]: r for r in records(out)}
    assert [by[s]["stochastic"] for s in ("euler", "euler-ancestral", "euler:churn=5")] == [False, True, True]
    assert "reference_rmse" in by["euler"]["metrics"]
    for name in ("euler-ancestral", "euler:churn=5"):
        assert "reference_rmse" not in by[name]["metrics"] and "fd" in by[name]["metrics"]
        assert "stochastic" in by[name]["not_applicable"]["reference"]
    verdicts = {v["metric"]: v for v in json.loads((out / "verdict.json").read_text())["verdicts"]}
    assert set(verdicts["reference_rmse"]["methods"]) == {"euler"}
    assert set(verdicts["fd"]["methods"]) == {"euler", "euler-ancestral", "euler:churn=5"}
    assert "n/a (stochastic)" in console
    assert "Verdict: RMSE to reference, closest to the model's own ODE" in console
    assert "Verdict: fd, closest to the data" in console and "PSNR" not in console.split("Verdict:", 1)[1]


def test_the_main_jobs_solves_ship_and_are_the_solves(tmp_path, monkeypatch):
    """The README's main job (digits, n=256, seed block 0) finds its references in the package
    on a fresh cache (nothing solved, nothing written), and they are what a solve here gives.
    After retraining `digits`, regenerate them: BENCH_CACHE=DIR bench run --samplers all
    --nfe 5,10,20 --metrics reference, then copy DIR/reference/* into bench/assets/reference/."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "fresh"))
    out = tmp_path / "run"
    assert bench_run(out, "--samplers", "euler,diffusers-ddim", "--nfe", "5", "--metrics", "reference") == 0
    for r in records(out):
        info = r["metric_info"]["reference"]
        assert (info["solved"], info["cached"]) == (0, 256), (r["method"], info)
    assert not cache_dir().exists() or not any(cache_dir().iterdir())
    # The first 4 samples solved again here match the shipped file to round-off
    model = load_model("digits")
    ctx = MetricContext("digits", model, 256, 0, torch.device("cpu"), {}, {})
    refs = References(ctx, float(model.sigma_max), 128)
    (path,) = SHIPPED.glob(f"{refs.name}-*.safetensors")
    with safe_open(str(path), "pt") as f:
        x0, seeds, indices = (f.get_tensor(k) for k in ("x0", "seeds", "indices"))
    assert seeds.tolist() == list(range(256))
    eps = SampleNoise(0, range(4), model.shape, "cpu")()
    assert torch.allclose(refs.solve(eps, indices[:4]), x0[:4], atol=1e-4)
