"""Upsample guidance on the embedded digits UNet (shipped weights), sampled at 16x16.

- w = 0 is plain sampling of the same network at 2x, bit for bit;
- w = 1 on the whole trajectory: the pooled 2x sample is the 1x sample of the same
  sampler on sigmas / 2 from the pooled noise (the low-frequency part of the 2x ODE is
  the 1x ODE; exact for Euler and DPM-Solver++(2M), whose steps are linear in D and
  depend on sigma ratios only);
- `bench run` counts the 2x calls against the budget, the low-resolution calls as
  nfe_extra, reports both and the total full-resolution cost; a model that cannot run
  at 2x is an infeasible cell, not a crash;
- the evaluation space: digits-classifier-v1 pools 16x16 to 8x8, so the reference data
  upscaled to 16x16 has exactly the shipped reference features.
"""

from __future__ import annotations

import csv

import pytest
import torch
from bench_upsample_guidance.guidance import apply, pool, upsample, vp_time

from bench import CountingDenoiser, Run, SampleNoise, load_model, resolve_options
from bench.cli import main
from bench.testing import (
    digits_features,
    digits_images,
    digits_reference_features,
    load_registry,
    single_threaded,
    to_uint8,
)

MODEL = "digits"
CPU = torch.device("cpu")
N = 8


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def digits(registry):
    return load_model(MODEL, CPU, registry=registry)


def solve(registry, name: str, model, eps: torch.Tensor, steps: int, scale: float = 1.0) -> torch.Tensor:
    """The sampler `name` on the karras schedule (sigmas / scale) from x = sigma_max eps."""
    sampler = registry.get("samplers", name)
    schedule = registry.get("schedules", "karras")
    sigmas = schedule.sigmas(
        steps,
        model.sigma_min,
        model.sigma_max,
        to_zero=True,
        denoiser=model,
        device=CPU,
        **resolve_options("schedule", "karras", schedule.options, {}),
    )
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32) / scale
    options = resolve_options("sampler", name, sampler.options, {})
    with torch.no_grad():
        return sampler.sample(model, eps * sigmas[0], sigmas, noise=lambda: torch.randn_like(eps), **options)


@single_threaded
def test_weight_zero_is_plain_sampling_at_2x(registry, digits):
    eps = SampleNoise(0, range(N), (1, 16, 16), CPU)()
    plain = solve(registry, "euler", CountingDenoiser(digits), eps, 4)
    counted = CountingDenoiser(digits)
    guided = apply(counted, m=2, w=0.0, eta=1.0)
    counted.count_shape = guided.shape  # as the runner sets it
    counted.reset()
    assert torch.equal(solve(registry, "euler", guided, eps, 4), plain)
    assert (counted.nfe, counted.extra) == (4, 0)


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m"])
@single_threaded
def test_unit_weight_pooled_is_the_1x_sampler_on_sigmas_over_m(registry, digits, sampler):
    eps = SampleNoise(1, range(N), (1, 16, 16), CPU)()
    guided = apply(CountingDenoiser(digits), m=2, w=1.0, eta=1.0)
    x_2x = solve(registry, sampler, guided, eps, 4)
    # D_2(sigma eps) = (sigma / 2) (2 D_2(eps)): unit noise 2 D_2(eps) at sigmas / 2
    x_1x = solve(registry, sampler, CountingDenoiser(digits), 2 * pool(eps, 2), 4, scale=2.0)
    assert torch.allclose(pool(x_2x, 2), x_1x, atol=2e-4)
    # ... while the 2x sample keeps detail of its own within each 2x2 block
    assert (x_2x - upsample(pool(x_2x, 2), 2)).abs().max() > 1e-2


@single_threaded
def test_bench_run_counts_the_extra_calls_and_reports_them(registry, tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--model",
            f"{MODEL},mixture",
            "--samplers",
            "euler",
            "--nfe",
            "4",
            "--modifiers",
            "upsample-guidance:w=0,upsample-guidance:w=1:eta=0.5",
            "--num-samples",
            str(N),
            "--batch-size",
            "8",
            "--metrics",
            "fid-digits",
            "--out",
            str(out),
            "--quiet",
            "--report",
            "csv,markdown",
        ]
    )
    assert code == 0
    records = {(r["model"], r["modifiers"][0]): r for r in Run.open(out).records}
    plain = records[(MODEL, "upsample-guidance:w=0")]
    guided = records[(MODEL, "upsample-guidance:w=1:eta=0.5")]
    assert plain["status"] == guided["status"] == "ok"
    assert plain["nfe_counted"] == guided["nfe_counted"] == 4
    assert (plain["nfe_extra"], plain["nfe_equiv"]) == (0, 4)
    # One low-resolution call per step whose sigma is in the guided fraction, at 1/4 the pixels
    t_on = 0.5 * float(vp_time(guided["sigmas"][0]))
    active = sum(float(vp_time(s)) > t_on for s in guided["sigmas"][:-1])
    assert 0 < active < 4
    assert (guided["nfe_extra"], guided["nfe_equiv"]) == (active, 4 + active / 4)
    assert "1x16x16 from 1x8x8" in guided["modifiers_applied"][0]
    # The analytic mixture cannot denoise 16x16 inputs: infeasible cells, the run goes on
    for key in (("mixture", "upsample-guidance:w=0"), ("mixture", "upsample-guidance:w=1:eta=0.5")):
        assert records[key]["status"] == "infeasible"
        assert "upsample-guidance is not applicable to model 'mixture'" in records[key]["reason"]
    # Reports: the extra calls, the total cost and what the modifier did
    report = (out / "report.md").read_text()
    for title in (
        "extra network calls at another resolution",
        "total cost in full-resolution NFE",
        "modifiers as applied",
    ):
        assert title in report
    with open(out / "results.csv") as f:
        rows = {row["modifiers"]: row for row in csv.DictReader(f) if row["model"] == MODEL}
    assert float(rows["upsample-guidance:w=1:eta=0.5"]["nfe_equiv"]) == 4 + active / 4


@single_threaded
def test_reference_upscaled_to_2x_has_the_shipped_features():
    images = to_uint8(digits_images()[:300])
    features = digits_features(upsample(images, 2))
    assert torch.allclose(features, digits_reference_features()[:300], atol=1e-5)
