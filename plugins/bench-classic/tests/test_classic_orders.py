"""Measured convergence orders on the analytic mixture, against a high-accuracy reference.

Each sampler runs at its default schedule with denoise_to_zero=false, so the schedule
ends at sigma_min and the reference is bench.testing.reference_solve to sigma_min (RK4 in
log sigma, float64, 512 steps) from the same noise. The error at a budget is the median
over 16 samples of each sample's RMS error (a sample near a boundary between modes
converges late and would dominate a mean). The order is the slope of log error against
log NFE between consecutive budgets, and from 20 to 80 NFE (the range the assertions
use). `pytest -s -k order_table` prints the table.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import SampleNoise
from bench.solvers import dpmpp_step
from bench.testing import mixture, reference_solve

BUDGETS = (10, 20, 40, 80)
# (spec, lowest order accepted from 20 to 80 NFE, lowest accepted from 10 to 20 NFE)
EXPECTED = [
    ("euler", 0.8, None),
    ("ddim", 0.8, None),
    ("heun", 1.8, None),
    ("dpm-solver-2", 1.8, None),
    ("dpm++2m", 1.8, None),
    ("dpm-solver-3", 2.7, None),
    ("dpm++3m:d2=taylor", 2.7, None),
    ("unipc", 2.7, None),
    ("unipc:order=2", 2.7, None),
    ("deis", 2.7, None),
    # Second order asymptotically (README), about three where they are used
    ("dpm++3m", 1.8, 2.7),
    ("ipndm", 1.8, 2.7),
]


@pytest.fixture(scope="module")
def problem():
    model = mixture()
    eps = SampleNoise(0, range(16), model.shape, "cpu")().double()
    ref = reference_solve(model, eps * model.sigma_max, model.sigma_max, model.sigma_min, steps=512)
    return model, eps, ref


def order(errors: list[float], i: int, j: int) -> float:
    """The slope of -log error against log NFE between budgets i and j."""
    return math.log(errors[i] / errors[j]) / math.log(BUDGETS[j] / BUDGETS[i])


SPANS = [(0, 1), (1, 2), (2, 3), (1, 3)]  # 10->20, 20->40, 40->80 and 20->80


@pytest.fixture(scope="module")
def table(problem, solve):
    """{spec: ([errors by budget], [orders over SPANS])}, printed."""
    model, eps, ref = problem
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for text, _, _ in EXPECTED:
        errors = []
        for nfe in BUDGETS:
            x0 = solve(model, text, nfe, eps, denoise_to_zero="false")[0]
            errors.append(float((x0 - ref).reshape(len(x0), -1).pow(2).mean(1).sqrt().median()))
        out[text] = (errors, [order(errors, i, j) for i, j in SPANS])
    torch.set_num_threads(threads)
    # The table: errors by budget, then the orders
    head = " ".join(f"{f'NFE {n}':>9}" for n in BUDGETS)
    spans = " ".join(f"{f'{BUDGETS[i]}->{BUDGETS[j]}':>7}" for i, j in SPANS)
    lines = [f"{'sampler':20} {head}   {spans}"]
    for text, (errors, orders) in out.items():
        cells = " ".join(f"{e:9.2e}" for e in errors) + "   " + " ".join(f"{o:7.2f}" for o in orders)
        lines.append(f"{text:20} {cells}")
    print("\nmedian RMS error to the reference (mixture, 16 samples), and measured order")
    print("\n".join(lines))
    return out


@pytest.mark.parametrize("text, asymptotic, early", EXPECTED)
def test_order_table(table, text, asymptotic, early):
    errors, orders = table[text]
    assert errors[-1] < errors[0]
    assert orders[-1] >= asymptotic, f"{text}: order {orders[-1]:.2f} between NFE 20 and 80"
    if early is not None:
        assert orders[0] >= early, f"{text}: order {orders[0]:.2f} between NFE 10 and 20"
    if asymptotic < 1.5:
        assert orders[-1] < 1.3, f"{text}: a first-order method measured {orders[-1]:.2f}"


def test_dpmpp3m_third_order_term_on_a_quadratic():
    """On data predictions m(lambda) quadratic in lambda, the update is the exact integral
    x_t = (sigma_t / sigma_s) x + int e^(u - h) m(u) du with d2="taylor"; the reference
    code's term carries half of the quadratic part (why it is second order)."""
    sigmas = [3.0, 2.0, 1.2]
    lam = [-math.log(s) for s in sigmas]
    sigma_t = 0.7
    h = math.log(sigmas[-1] / sigma_t)
    ms = [torch.tensor([(u - lam[-1]) ** 2 / 2], dtype=torch.float64) for u in lam]
    x = torch.zeros(1, dtype=torch.float64)
    quad = h**2 / 2 - h + 1 - math.exp(-h)  # int_0^h e^(u - h) u^2 / 2 du
    assert float(dpmpp_step(x, sigma_t, sigmas, ms, d2="taylor")) == pytest.approx(quad, rel=1e-12)
    assert float(dpmpp_step(x, sigma_t, sigmas, ms)) == pytest.approx(quad / 2, rel=1e-12)
    # Constant and linear m are exact either way
    lin = [torch.tensor([u - lam[-1]], dtype=torch.float64) for u in lam]
    exact = h - 1 + math.exp(-h)
    assert float(dpmpp_step(x, sigma_t, sigmas, lin)) == pytest.approx(exact, rel=1e-12)
