"""Fit cost: each AMED sampler's fit on the embedded digits UNet at the default budgets.

A fit is what `bench run` does on first use: the default options, the predictor reading the
UNet's bottleneck, the teacher on the finer grid. Each is timed once (the fit runs torch on
one thread, see `bench_amed.fit.one_cpu_thread`).
Target: under 5 minutes per budget on a 2-core CPU.

    pytest plugins/bench-amed/benchmarks --benchmark-only -s
"""

from __future__ import annotations

import pytest
import torch
from bench_amed.prepare import prepare
from bench_amed.samplers import BASES

import bench
from bench.testing import load_registry

TARGET_S = 300.0


@pytest.fixture(scope="module")
def digits():
    registry = load_registry()
    return registry, bench.load_model("digits", torch.device("cpu"), registry=registry)


@pytest.mark.parametrize("nfe", [5, 10, 20])
@pytest.mark.parametrize("name", list(BASES))
def test_fit_cost(benchmark, digits, name, nfe, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    registry, model = digits
    cell = bench.CellSpec("digits", bench.Method(bench.Spec(name)), nfe)
    recipe = bench.resolve(registry, cell, model, "cpu")  # options, plan and sigmas, as a run makes them
    counted = bench.CountingDenoiser(model)

    def fit():
        return prepare(name, BASES[name], counted, recipe.sigmas, recipe.options, force=True)

    prepared = benchmark.pedantic(fit, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.max
    print(f"\n{name} @ NFE {nfe}: fit {seconds:.1f} s, {counted.nfe} network calls")
    assert prepared["predictor_kind"] == "bottleneck"
    assert seconds < TARGET_S, f"{name} @ NFE {nfe}: fit took {seconds:.0f} s (target {TARGET_S:.0f} s)"
