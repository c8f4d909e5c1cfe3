"""The embedded digits models: shipped UNet weights, bottleneck, named skips, the
deterministic training command, the exact optimal denoiser, and each cell's PNG grid."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from bench import Method, Spec
from bench.cli import main
from bench.metrics.digits_classifier import digits
from bench.models.digits import FLOW_FIELDS, FLOW_WEIGHTS, WEIGHTS, TrainConfig, UNet, load_unet
from bench.nfe import CountingDenoiser
from bench.plugins import load_registry
from bench.records import read_lines as read_records
from bench.rundir import RESULTS
from bench.runner import RunConfig, run


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def unet(registry):
    return registry.get("models", "digits").load(None)


@pytest.fixture(scope="module")
def images():
    return digits()[0]


def test_shipped_weights_give_finite_outputs_at_8x8_and_16x16(unet):
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 4_000_000
    gen = torch.Generator().manual_seed(0)
    for side in (8, 16):
        x = 20 * torch.randn(3, 1, side, side, generator=gen)
        with torch.no_grad():
            out = unet(x, torch.tensor([20.0, 1.0, 0.05]))
        assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_small_sigma_returns_the_input(unet, images):
    y = images[:32]
    with torch.no_grad():
        x0 = unet(y, unet.sigma_min)
    assert float((x0 - y).abs().max()) < 0.02


def test_denoises_real_digits_better_than_the_data_mean(unet, images):
    """At a moderate noise level the trained model must beat the trivial denoiser (the mean)."""
    y = images[:256]
    x = y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = float((unet(x, 0.5) - y).square().mean())
    assert err < 0.5 * float((images.mean(0) - y).square().mean())


def test_bottleneck_comes_from_the_same_single_network_call(unet, images):
    calls = []
    hook = unet.net.register_forward_hook(lambda *_: calls.append(1))
    try:
        counted = CountingDenoiser(unet)
        with torch.no_grad():
            x0, feature = counted(images[:4], 0.7, return_bottleneck=True)
            plain = unet(images[:4], 0.7)
    finally:
        hook.remove()
    assert unet.has_bottleneck and counted.nfe == 1 and len(calls) == 2  # one each
    channels = unet.net.config.channels[-1]
    assert feature.shape == (4, channels, 2, 2)
    assert torch.equal(x0, plain)


def test_skips_are_reachable_by_name(unet, images):
    """A forward pre-hook on the decoder block `up[name]` scales that skip, as skip-tuning does."""
    net = unet.net
    assert net.skip_names == ["skip0", "skip1"]
    x = images[:4] + 0.3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def scaled(name: str, factor: float) -> torch.Tensor:
        block = net.up[name]
        assert block.skip_name == name
        hook = block.register_forward_pre_hook(lambda m, args: (args[0], args[1] * factor, args[2]))
        try:
            with torch.no_grad():
                return unet(x, 0.3)
        finally:
            hook.remove()

    with torch.no_grad():
        base = unet(x, 0.3)
    assert torch.equal(scaled("skip0", 1.0), base)
    for name in net.skip_names:
        assert float((scaled(name, 0.8) - base).abs().max()) > 1e-3


def _train(tmp_path, name: str, *extra: str) -> bytes:
    out = tmp_path / name
    args = [
        "train-digits",
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--limit",
        "64",
        "--channels",
        "8,16",
        "--quiet",
        *extra,
    ]
    assert main(args) == 0
    return out.read_bytes()


def test_training_command_is_deterministic(tmp_path, capsys):
    first, second = _train(tmp_path, "a.safetensors"), _train(tmp_path, "b.safetensors")
    assert first == second
    assert _train(tmp_path, "c.safetensors", "--seed", "1") != first
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["final_loss"] > 0 and summary["final_loss_steps"] == 3
    # What it wrote loads as a model source, at its own channel widths
    net, config = load_unet(tmp_path / "a.safetensors")
    assert isinstance(net, UNet) and net.config.channels == (8, 16) and config["steps"] == 3


def test_training_command_rejects_bad_input(tmp_path, capsys):
    assert main(["train-digits", "--out", str(tmp_path / "x"), "--channels", "8,x"]) == 2
    assert "--channels" in capsys.readouterr().err
    missing = f"digits:{tmp_path / 'missing.safetensors'}"
    assert main(["run", "--model", missing, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-digits" in err
    assert main(["run", "--model", "digits-optimal:x", "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    assert "takes no argument" in capsys.readouterr().err


def test_optimal_denoiser_is_the_softmax_average_of_the_digits(registry, images):
    model = registry.get("models", "digits-optimal").load(None)
    gen = torch.Generator().manual_seed(3)
    x = images[:5] + 0.8 * torch.randn(5, 1, 8, 8, generator=gen)
    sigma = torch.tensor([0.05, 0.3, 0.8, 2.0, 40.0])
    # Direct: every pairwise squared distance, softmax over the images, weighted average
    y = images.double().reshape(len(images), -1)
    logits = -((x.double().reshape(5, 1, -1) - y) ** 2).sum(-1) / (2 * sigma.double()[:, None] ** 2)
    direct = (torch.softmax(logits, dim=1) @ y).reshape(x.shape)
    assert torch.allclose(model(x.double(), sigma).double(), direct, atol=1e-10, rtol=0)
    # Near sigma = 0 it returns the nearest training image exactly; at large sigma, the mean
    near = images[10:13] + 0.01 * torch.randn(3, 1, 8, 8, generator=gen)
    assert torch.equal(model(near, 0.02), images[10:13])
    assert torch.allclose(model(x, 1e4), images.mean(0).expand_as(x), atol=1e-5)


def test_each_cell_saves_a_png_grid_of_its_first_samples(registry, tmp_path):
    config = RunConfig(
        models=["digits-optimal"],
        methods=[Method(Spec("euler"))],
        nfe=[3],
        num_samples=20,
        batch_size=12,
        metrics=[],
        out=tmp_path / "run",
    )
    run(registry, config)
    (record,) = read_records(tmp_path / "run" / RESULTS)
    assert record["status"] == "ok" and record["grid"] == f"samples/{record['cell_id']}.png"
    with Image.open(tmp_path / "run" / record["grid"]) as png:
        # 12 images of the first batch in an 8-wide grid, enlarged to >= 256 px a side
        assert png.size[0] >= 256 and png.size[0] > png.size[1]


# --- digits-flow: the same UNet trained with rectified flow --------------------------------


@pytest.fixture(scope="module")
def flow(registry):
    return registry.get("models", "digits-flow").load(None)


def test_digits_flow_is_registered_with_the_digits_metrics_and_its_schedule(registry, flow, capsys):
    source = registry.get("models", "digits-flow")
    assert source.default_metrics == registry.get("models", "digits").default_metrics
    assert FLOW_WEIGHTS.is_file() and FLOW_WEIGHTS.stat().st_size < 4_000_000
    assert flow.default_schedule == "flow" and flow.time_scale == 1000.0 and flow.prediction == "velocity"
    assert (flow.sigma_min, flow.sigma_max) == pytest.approx((0.002, 80.0))
    assert flow.data_samples(5).shape == (5, 1, 8, 8)  # the data floor
    assert main(["list", "models"]) == 0 and "digits-flow" in capsys.readouterr().out


def test_digits_flow_denoises_real_digits(flow, images):
    """x0 = x_t - t v from the network: better than the data mean at a moderate noise level,
    the input itself near sigma_min."""
    y = images[:256]
    x = y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = float((flow(x, 0.5) - y).square().mean())
        near = float((flow(y, flow.sigma_min) - y).abs().max())
    assert err < 0.5 * float((images.mean(0) - y).square().mean()) and near < 0.05


def test_training_objectives_keep_apart_and_edm_metadata_unchanged(tmp_path, capsys):
    first = _train(tmp_path, "f1.safetensors", "--objective", "flow")
    assert _train(tmp_path, "f2.safetensors", "--objective", "flow") == first  # deterministic
    assert _train(tmp_path, "e.safetensors") != first
    _, flow_config = load_unet(tmp_path / "f1.safetensors")
    assert flow_config["objective"] == "flow" and flow_config["time_scale"] == 1000.0
    # The EDM recipe's metadata is what it was before the flow objective: the shipped file's
    _, shipped = load_unet(WEIGHTS)
    recipe = {k: v for k, v in TrainConfig().__dict__.items() if k not in FLOW_FIELDS}
    assert shipped == json.loads(json.dumps(recipe))
    capsys.readouterr()
    # Each file loads only as its own model, in one line
    for k, (spec, hint) in enumerate(((f"digits:{tmp_path / 'f1.safetensors'}", "digits-flow:"),
                                      (f"digits-flow:{tmp_path / 'e.safetensors'}", "as digits:"))):
        assert main(["run", "--model", spec, "--out", str(tmp_path / f"run{k}"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and hint in err, err
