"""Run options for speed (autocast precision, channels_last) and the random-weight
throughput model."""

from __future__ import annotations

import pytest
import torch

from bench import load_model
from bench.plugins import load_registry
from bench.testing import random_unet
from bench.throughput import Accelerated, accelerate, full_precision


@pytest.fixture(scope="module")
def unet():
    return random_unet()


def outputs(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's prediction at three noise levels for a fixed batch, and the input."""
    x = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return torch.stack([model(x * s, s) for s in (0.05, 1.0, 20.0)]), x


def test_defaults_leave_the_model_alone(unet):
    assert accelerate(unet) is unet and full_precision(unet) is unet


def test_bf16_runs_the_network_in_bf16_and_hands_back_float32(unet):
    fp32, _ = outputs(unet)
    fast = accelerate(unet, dtype="bf16")
    bf16, _ = outputs(fast)
    assert isinstance(fast, Accelerated) and full_precision(fast) is unet
    assert bf16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: close to fp32, never equal
    assert not torch.equal(bf16, fp32)
    assert torch.allclose(bf16, fp32, rtol=0.05, atol=0.05)


def test_channels_last_changes_the_layout_not_the_numbers():
    unet = random_unet()  # converted in place: its own copy
    fp32, x = outputs(unet)
    fast = accelerate(unet, channels_last=True)
    converted = [p for p in unet.parameters() if p.dim() == 4 and not p.is_contiguous()]
    assert converted and all(p.is_contiguous(memory_format=torch.channels_last) for p in converted)
    out, _ = outputs(fast)
    assert out.is_contiguous()
    assert torch.allclose(out, fp32, rtol=1e-4, atol=1e-5)


def test_throughput_model_is_the_ddpm_cifar10_unet_with_random_weights():
    registry = load_registry()
    source = registry.get("models", "throughput-ddpm-cifar10")
    assert source.default_metrics == () and "RANDOM WEIGHTS" in source.description
    model = load_model("throughput-ddpm-cifar10", torch.device("cpu"), registry=registry)
    facts = model.describe()
    assert facts["parameters"] == 35_746_307  # google/ddpm-cifar10-32's UNet2DModel
    assert "random" in facts["weights"] and facts["timesteps"] == 1000 and model.shape == (3, 32, 32)
    with torch.inference_mode():
        x0 = model(torch.randn(1, 3, 32, 32) * 10.0, 10.0)
    assert x0.shape == (1, 3, 32, 32) and bool(torch.isfinite(x0).all())
    # The seed picks the random network
    other = load_model("throughput-ddpm-cifar10:1", torch.device("cpu"), registry=registry)
    assert not torch.equal(model.net.conv_in.weight, other.net.conv_in.weight)


def test_noise_drawn_ahead_is_the_same_stream():
    """The runner draws a stochastic sampler's noise before timing it: same numbers, in order."""
    from bench.cell import NoiseAhead
    from bench.seeding import SampleNoise

    lazy = SampleNoise(3, range(5), (1, 4, 4), "cpu")
    fresh = SampleNoise(3, range(5), (1, 4, 4), "cpu")
    eps = fresh()
    ahead = NoiseAhead(fresh, 2, eps)  # two draws made now, the rest when asked
    assert torch.equal(lazy(), eps)
    for _ in range(4):
        assert torch.equal(lazy(), ahead())
    assert ahead.draws == 4
