"""The embedded MNIST models: shipped weights, the UNet's skips and bottleneck as modifiers
reach them, the deterministic training command, and the representativeness script's rank
correlations."""

from __future__ import annotations

import importlib.util
import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from bench import Method, Spec
from bench.cli import main
from bench.data import WHEEL, mnist_samples
from bench.files import cache_dir
from bench.models.mnist import FLOW_WEIGHTS, WEIGHTS, TrainConfig, UNet, UNetConfig, load_unet
from bench.nfe import CountingDenoiser
from bench.plugins import load_registry
from bench.records import read_lines as read_records
from bench.rundir import RESULTS
from bench.runner import RunConfig, run
from bench.training import deterministic, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def mnist(registry):
    return registry.get("models", "mnist").load(None)


@pytest.fixture(scope="module")
def flow(registry):
    return registry.get("models", "mnist-flow").load(None)


@pytest.fixture(scope="module")
def images():
    return mnist_samples(256, seed=1)


def test_sources_are_registered_with_the_mnist_metrics_and_data(registry, mnist, flow, capsys):
    for name in ("mnist", "mnist-flow"):
        assert registry.get("models", name).default_metrics == ("fid-mnist", "kid-mnist", "reference")
    for path in (WEIGHTS, FLOW_WEIGHTS):
        assert path.is_file() and path.stat().st_size < 5_000_000
    assert mnist.shape == flow.shape == (1, 28, 28) and mnist.has_bottleneck and not flow.has_bottleneck
    for model in (mnist, flow):
        assert (model.sigma_min, model.sigma_max) == pytest.approx((0.002, 80))
    assert flow.default_schedule == "flow" and flow.time_scale == 1000.0 and flow.prediction == "velocity"
    assert mnist.sigma_data == flow.sigma_data == 0.62
    assert mnist.data_samples(3).shape == (3, 1, 28, 28)  # the data floor
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "mnist " in out and "mnist-flow" in out


@pytest.mark.parametrize("which", ["mnist", "flow"])
def test_shipped_models_denoise_real_digits(which, mnist, flow, images):
    """Better than the data mean at moderate noise, close to the input near sigma_min,
    finite at 28x28 and at 56x56 (fully convolutional)."""
    model = mnist if which == "mnist" else flow
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        noisy = images + 0.5 * torch.randn(images.shape, generator=gen)
        err = float((model(noisy, 0.5) - images).square().mean())
        near = float((model(images, model.sigma_min) - images).abs().max())
        big = model(20 * torch.randn(2, 1, 56, 56, generator=gen), torch.tensor([20.0, 0.3]))
    assert err < 0.3 * float((images.mean(0) - images).square().mean())
    assert near < 0.05
    assert big.shape == (2, 1, 56, 56) and bool(torch.isfinite(big).all())


def test_bottleneck_comes_from_the_same_single_network_call(mnist, images):
    calls = []
    hook = mnist.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        counted = CountingDenoiser(mnist)
        with torch.no_grad():
            x0, feature = counted(images[:4], 0.7, return_bottleneck=True)
            plain = mnist(images[:4], 0.7)
    finally:
        hook.remove()
    assert counted.nfe == 1 and len(calls) == 2  # one each
    assert feature.shape == (4, mnist.net.config.channels[-1], 7, 7)
    assert torch.equal(x0, plain)


def test_skips_are_reachable_by_name(mnist, images):
    """Forward pre-hooks on the `up[name]` blocks scale their skips, as skip-tuning does: a
    factor of 1 on every skip changes nothing, 0.8 on any one skip changes the output."""
    net = mnist.net
    assert net.skip_names == [f"skip{k}" for k in range(2 * net.config.blocks)]
    assert all(net.up[name].skip_name == name for name in net.skip_names)
    x = images[:4] + 0.3 * torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))

    def output(factors: dict[str, float]) -> torch.Tensor:
        hooks = [net.up[name].register_forward_pre_hook(partial(lambda f, m, a: (a[0], a[1] * f, a[2]), f))
                 for name, f in factors.items()]
        try:
            with torch.no_grad():
                return mnist(x, 0.3)
        finally:
            for hook in hooks:
                hook.remove()

    base = output({})
    assert torch.equal(output(dict.fromkeys(net.skip_names, 1.0)), base)
    changes = [float((output({name: 0.8}) - base).abs().max()) for name in net.skip_names]
    assert min(changes) > 1e-3, changes


def test_modifiers_reach_the_skips_and_the_larger_resolution(registry, tmp_path):
    """skip-tuning scales every named skip; upsample guidance samples 56x56 with its extra
    28x28 calls counted; both change the samples."""
    methods = [Method(Spec("euler")),
               Method(Spec("euler"), modifiers=(Spec.parse("skip-tuning:rho_bottom=0.8:rho_top=1.2"),)),
               Method(Spec("euler"), modifiers=(Spec.parse("upsample-guidance:w=0"),)),
               Method(Spec("euler"), modifiers=(Spec.parse("upsample-guidance:w=1"),))]
    config = RunConfig(models=["mnist"], methods=methods, nfe=[5], num_samples=4, batch_size=4, metrics=[],
                       out=tmp_path / "run", save_samples=True)
    run(registry, config)
    records = read_records(tmp_path / "run" / RESULTS)
    assert [r["status"] for r in records] == ["ok"] * 4, [r.get("reason") for r in records]
    plain, tuned, big, guided = records
    assert "4 skips" in tuned["modifiers_applied"][0]
    assert big["nfe_extra"] == 0 and guided["nfe_extra"] > 0

    def samples(record):
        import numpy as np

        with np.load(tmp_path / "run" / record["samples"]) as data:
            return data["arr_0"].astype(int)

    assert samples(big).shape == (4, 56, 56, 1)
    assert (samples(tuned) != samples(plain)).any() and (samples(guided) != samples(big)).any()


# --- Training -------------------------------------------------------------------------------


def tiny(objective: str = "edm", seed: int = 0) -> TrainConfig:
    return TrainConfig(steps=3, batch_size=8, warmup=2, channels=(8, 16), blocks=1, heads=2,
                       objective=objective, seed=seed)


def test_training_is_deterministic(tmp_path):
    """The training loop, twice on the same images: the same weights; another seed or the
    flow objective: others."""
    data = mnist_samples(64)

    def weights(config: TrainConfig) -> list[torch.Tensor]:
        with deterministic():
            net, summary = train(config, data, partial(UNet, config.unet()))
        assert summary["final_loss"] > 0 and summary["final_loss_steps"] == 3
        return list(net.state_dict().values())

    first = weights(tiny())
    assert all(torch.equal(a, b) for a, b in zip(first, weights(tiny()), strict=True))
    for other in (tiny(seed=1), tiny("flow")):
        assert not all(torch.equal(a, b) for a, b in zip(first, weights(other), strict=True))


def have_wheel() -> bool:
    directory = Path(os.environ.get("BENCH_MNIST_DIR") or cache_dir("mnist"))
    return (directory / WHEEL).is_file()


def _train(tmp_path, name: str, *extra: str) -> bytes:
    out = tmp_path / name
    args = ["train-mnist", "--out", str(out), "--steps", "2", "--batch-size", "8", "--limit", "64",
            "--channels", "8,16", "--blocks", "1", "--heads", "2", "--quiet", *extra]
    assert main(args) == 0
    return out.read_bytes()


@pytest.mark.skipif(not have_wheel(), reason="the MNIST wheel is not fetched (bench.data.mnist_wheel)")
def test_training_command_writes_the_same_bytes_twice(tmp_path, capsys):
    first = _train(tmp_path, "a.safetensors")
    assert _train(tmp_path, "b.safetensors") == first
    flow_bytes = _train(tmp_path, "f.safetensors", "--objective", "flow")
    assert flow_bytes != first
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_loss"] > 0 and summary["final_loss_steps"] == 2
    net, config = load_unet(tmp_path / "a.safetensors")
    assert net.config == UNetConfig(channels=(8, 16), blocks=1, heads=2) and config["limit"] == 64
    # Each file loads as its own model only, in one line
    for k, (spec, hint) in enumerate(((f"mnist:{tmp_path / 'f.safetensors'}", "mnist-flow:"),
                                      (f"mnist-flow:{tmp_path / 'a.safetensors'}", "as mnist:"))):
        assert main(["run", "--model", spec, "--out", str(tmp_path / f"run{k}"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and hint in err, err


@pytest.mark.parametrize("args, says", [
    (["--objective", "velocity"], "--objective"),
    (["--channels", "8,x"], "--channels"),
    (["--channels", "8"], "--channels"),
    (["--heads", "3"], "--heads"),
    (["--heads", "-1"], "--heads"),
    (["--steps", "0"], "--steps"),
    (["--lr", "nan"], "--lr"),
    (["--limit", "0"], "--limit"),
])
def test_training_command_rejects_bad_input_in_one_line(tmp_path, capsys, args, says):
    assert main(["train-mnist", "--out", str(tmp_path / "x.safetensors"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_weights_name_the_training_command(tmp_path, capsys):
    missing = f"mnist:{tmp_path / 'missing.safetensors'}"
    assert main(["run", "--model", missing, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-mnist" in err, err


# --- The representativeness script ----------------------------------------------------------


@pytest.fixture(scope="module")
def rep():
    path = ROOT / "benchmarks" / "representativeness.py"
    spec = importlib.util.spec_from_file_location("representativeness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_on_small_cases(rep):
    assert rep.spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == pytest.approx(1)
    assert rep.spearman({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == pytest.approx(-1)
    # Ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert rep.spearman({"a": 1, "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 3}) == pytest.approx(0.8660254)
    # Only keys both sides hold with finite values count; fewer than 3 give None
    assert rep.spearman({"a": 1, "b": 2, "c": 3, "d": 0}, {"a": 1, "b": 2, "c": 3}) == pytest.approx(1)
    assert rep.spearman({"a": 1, "b": 2, "c": float("nan")}, {"a": 1, "b": 2, "c": 3}) is None
    assert rep.spearman({"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 2, "c": 3}) is None


def test_correlations_between_the_published_tables(rep):
    """Odd budgets rank the 5 solvers that can spend them; the means over NFE 3..10 between
    the published tables are the figures the model card compares with."""
    cifar, ffhq, imagenet = (rep.published(n) for n in ("CIFAR-10", "FFHQ-64", "ImageNet-64"))
    assert set(cifar["Heun"]) == {4, 6, 8, 10} and len(cifar["Euler"]) == 8
    assert rep.correlations(cifar, cifar)["mean"] == pytest.approx(1)
    assert rep.correlations(cifar, ffhq)["mean"] == pytest.approx(0.9661, abs=1e-4)
    assert rep.correlations(ffhq, imagenet)["mean"] == pytest.approx(0.7580, abs=1e-4)
    assert rep.correlations(cifar, imagenet)["mean"] == pytest.approx(0.8089, abs=1e-4)
    # A measured table with one solver reversed at NFE 3: rho over the 5 feasible solvers
    measured = {s: dict(v) for s, v in cifar.items()}
    measured["Euler"][3], measured["iPNDM-4"][3] = measured["iPNDM-4"][3], measured["Euler"][3]
    per_nfe = rep.correlations(measured, cifar)["per_nfe"]
    assert per_nfe[3] == pytest.approx(1 - 6 * (2**2 + 2**2) / (5 * (5**2 - 1)))
    assert all(per_nfe[n] == pytest.approx(1) for n in range(4, 11))


def test_every_solver_of_the_protocol_plans_its_budgets_exactly(rep, registry):
    """Each mapped sampler takes 1 NFE a step (Heun and DPM-Solver-2: 2, so odd budgets are
    infeasible, the tables' '-'), with no AFS and stopping at sigma_min."""
    from bench import resolve_options
    from bench.errors import Infeasible

    for solver, (sampler, schedule) in rep.SOLVERS.items():
        spec, s = Spec.parse(sampler), registry.get("samplers", Spec.parse(sampler).name)
        registry.get("schedules", Spec.parse(schedule).name)  # installed
        options = resolve_options("sampler", s.name, s.options, dict(spec.options))
        assert options["afs"] == "false" and options["denoise_to_zero"] is False
        feasible = {}
        for nfe in rep.NFES:
            try:
                plan = s.plan(nfe, options)
            except Infeasible:
                continue
            assert plan.nfe == nfe and not plan.to_zero
            feasible[nfe] = plan.steps
        assert set(feasible) == set(rep.published("CIFAR-10")[solver]), solver
        per_step = 2 if solver in ("Heun", "DPM-Solver-2") else 1
        assert all(steps * per_step == nfe for nfe, steps in feasible.items()), solver
