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

from bench import Spec, load_model
from bench.cell import make_sigmas
from bench.contracts import resolve_options
from bench.nfe import CountingDenoiser
from bench.plugins import load_registry

TARGET_S = 300.0


@pytest.fixture(scope="module")
def digits():
    registry = load_registry()
    return registry, load_model("digits", torch.device("cpu"), registry=registry)


@pytest.mark.parametrize("nfe", [5, 10, 20])
@pytest.mark.parametrize("name", list(BASES))
def test_fit_cost(benchmark, digits, name, nfe, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    registry, model = digits
    sampler = registry.get("samplers", name)
    options = resolve_options("sampler", name, sampler.options, {})
    plan = sampler.plan(nfe, options)
    spec = Spec.parse(sampler.default_schedule)
    schedule = registry.get("schedules", spec.name)
    sigmas = make_sigmas(
        schedule,
        resolve_options("schedule", spec.name, schedule.options, dict(spec.options)),
        plan,
        model,
        "cpu",
    )
    counted = CountingDenoiser(model)

    def fit():
        return prepare(name, BASES[name], counted, sigmas, {**options, **plan.options}, force=True)

    prepared = benchmark.pedantic(fit, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.max
    print(f"\n{name} @ NFE {nfe}: fit {seconds:.1f} s, {counted.nfe} network calls")
    assert prepared["predictor_kind"] == "bottleneck"
    assert seconds < TARGET_S, f"{name} @ NFE {nfe}: fit took {seconds:.0f} s (target {TARGET_S:.0f} s)"
