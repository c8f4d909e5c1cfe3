"""Sampler throughput on the embedded default model, with pytest-benchmark.

One benchmark per installed sampler (real entry-point discovery, so a plugin's samplers
join by being installed): a batch of BATCH samples at a budget of NFE (or the sampler's
next feasible one), under the real NFE counter, the sampler's own preparation done
beforehand. The project's pytest options skip benchmarks (`--benchmark-skip`);
`--benchmark-only` runs them:

    pytest benchmarks --benchmark-only --benchmark-autosave              # record a baseline
    pytest benchmarks --benchmark-only --benchmark-compare \\
        --benchmark-compare-fail=median:25%                              # fail if slower

BENCH_BENCHMARK_MODEL, BENCH_BENCHMARK_NFE, BENCH_BENCHMARK_BATCH and BENCH_BENCHMARK_THREADS
change the model spec (default: the CLI's default model), the budget (10), the batch size
(64) and torch's intra-op threads (1: steadier timings on a shared machine).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import DEFAULT_MODEL, CellSpec, Method, SampleNoise, Spec, build, load_model
from bench.testing import Case, registry

MODEL = os.environ.get("BENCH_BENCHMARK_MODEL", DEFAULT_MODEL)
NFE = int(os.environ.get("BENCH_BENCHMARK_NFE", "10"))
BATCH = int(os.environ.get("BENCH_BENCHMARK_BATCH", "64"))
THREADS = int(os.environ.get("BENCH_BENCHMARK_THREADS", "1"))


@pytest.fixture(scope="module")
def denoiser():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield load_model(MODEL, torch.device("cpu"), registry=registry())
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", registry().names("samplers"))
def test_sampler_throughput(benchmark, denoiser, name):
    """Seconds per batch of one sampler's solve at the budget; asserts the NFE it spent."""
    case = Case.of(name)
    nfe = case.nearest(NFE, "throughput")
    # The cell as a run builds it, on the sampler's default schedule; the sampler's own
    # preparation happens there, once, outside the timing
    method = Method(Spec(case.name), Spec.parse(case.sampler.default_schedule))
    cell = build(registry(), CellSpec(MODEL, method, nfe, num_samples=BATCH), denoiser, "cpu")
    options, counted = {**cell.options, **cell.prepared}, cell.counter
    noise = SampleNoise(0, torch.arange(BATCH), tuple(denoiser.shape), "cpu")
    x = noise() * cell.sigmas[0]

    def solve():
        counted.reset()
        with torch.inference_mode():
            return cell.sampler.sample(counted, x, cell.sigmas, noise=noise, **options)

    x0 = benchmark.pedantic(solve, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(model=MODEL, nfe=nfe, batch=BATCH, threads=THREADS, model_s=counted.model_s)
    assert counted.nfe == cell.plan.nfe and bool(torch.isfinite(x0).all())
