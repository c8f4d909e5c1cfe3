"""Solver overhead: time spent outside the model as a fraction of the time inside it.

The model is a small conv net (four 3x3 convolutions of 64 channels on 3x16x16 images,
random init, EDM preconditioning) at batch 256, counted and timed by the harness's own
CountingDenoiser. Each sampler runs at its defaults for NFE = 10; the fraction is
(wall - time in the model) / time in the model, the median over the rounds. Noise comes
from one batched torch.randn, so the figure is the solver's own arithmetic (the runner's
per-sample noise streams cost extra, for stochastic samplers only). Torch runs on one
thread: on a shared CPU, waits for a second thread's time slice make both sides of the
ratio erratic. Target: under 2%.

    pytest plugins/bench-classic/benchmarks --benchmark-only -s
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import bench
from bench.adapters import Preconditioned
from bench.testing import load_registry, samplers_of

NFE, BATCH, SHAPE = 10, 256, (3, 16, 16)
TARGET = 0.02
RESULTS: dict[str, float] = {}


class ConvNet(torch.nn.Module):
    """F(x, c_noise): four 3x3 convolutions with SiLU, the noise level added as a bias."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        c = SHAPE[0]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, 3, padding=1)
            for a, b in [(c, channels), (channels, channels), (channels, channels), (channels, c)]
        )

    def forward(self, x, c_noise):
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h) + (c_noise.reshape(-1, 1, 1, 1) if i == 0 else 0)
            h = torch.nn.functional.silu(h) if i < len(self.convs) - 1 else h
        return h


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Preconditioned(ConvNet(), "edm", SHAPE).eval()
    yield load_registry(), model
    torch.set_num_threads(threads)
    # The table, once every sampler has run
    print(f"\nsolver overhead at NFE {NFE}, batch {BATCH}, {SHAPE} conv net (target < {TARGET:.0%})")
    for name, fraction in RESULTS.items():
        print(f"  {name:16} {fraction:7.2%}")


@pytest.mark.parametrize("name", samplers_of("bench-classic"))
def test_solver_overhead(benchmark, setup, name):
    registry, model = setup
    cell = bench.CellSpec("conv-net", bench.Method(bench.Spec(name)), NFE)
    recipe = bench.resolve(registry, cell, model, "cpu")  # the sampler's defaults and default schedule
    sampler, sigmas = recipe.sampler, recipe.sigmas
    x_T = torch.randn(BATCH, *SHAPE) * sigmas[0]
    noise = lambda: torch.randn(BATCH, *SHAPE)  # noqa: E731
    counted = bench.CountingDenoiser(model)
    fractions = []

    def once():
        counted.reset()
        start = time.perf_counter()
        with torch.inference_mode():
            sampler.sample(counted, x_T, sigmas, noise=noise, **recipe.options)
        wall = time.perf_counter() - start
        fractions.append((wall - counted.model_s) / counted.model_s)

    benchmark.pedantic(once, rounds=3, warmup_rounds=1)
    RESULTS[name] = statistics.median(fractions)
    benchmark.extra_info.update(overhead_fraction=RESULTS[name], nfe=NFE, batch=BATCH)
    assert counted.nfe == NFE
    assert RESULTS[name] < TARGET, f"{name}: solver overhead {RESULTS[name]:.2%} of model time"


def test_per_sample_noise_cost(benchmark):
    """What the runner's per-sample noise streams cost per draw at this batch (for the note)."""
    noise = bench.SampleNoise(0, range(BATCH), SHAPE, "cpu")
    benchmark(noise)
