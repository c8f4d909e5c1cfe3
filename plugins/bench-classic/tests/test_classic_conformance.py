"""The host's conformance suite on every sampler and schedule bench-classic registers.

bench.testing checks, through the installed plugin and the real NFE counter, on the
analytic Gaussian: exact NFE planning at budgets 1..12, shapes, determinism, batch-size
invariance, and convergence to the closed-form ODE solution (deterministic samplers, at
the order given below, measured between 64 and 128 NFE) or to the exact data moments
(stochastic samplers).
"""

from __future__ import annotations

import pytest

from bench.testing import check_sampler, check_schedule, samplers_of, schedules_of

DIST = "bench-classic"

# Asymptotic orders on the Gaussian, measured with denoise_to_zero=false (the exact solution
# then ends at sigma_min; the final denoise's O(sigma_min^2) error would floor the
# third-order ones). dpm++3m's reference third-order term and iPNDM's fixed equal-step
# coefficients on a non-uniform grid are second order asymptotically (see the README).
ORDERS = {
    "euler": 1,
    "ddim": 1,
    "heun": 2,
    "dpm-solver-2": 2,
    "dpm-solver-3": 3,
    "dpm++2m": 2,
    "dpm++3m": 2,
    "unipc": 3,
    "ipndm": 2,
    "deis": 3,
}


@pytest.mark.parametrize("name", samplers_of(DIST))
def test_sampler_conformance(name):
    """Every sampler at its defaults: the `--samplers all` configuration."""
    check_sampler(name)


@pytest.mark.parametrize("name", list(ORDERS))
def test_order_on_the_gaussian(name):
    check_sampler(name, options={"denoise_to_zero": "false"}, order=ORDERS[name])


@pytest.mark.parametrize(
    "name, options",
    [
        ("heun", {"denoise_to_zero": "false"}),
        ("dpm-solver-2", {"denoise_to_zero": "false"}),
        ("dpm++3m", {"d2": "taylor"}),
        ("unipc", {"variant": "bh1", "order": 2}),
        ("deis", {"mode": "rhoab"}),
        ("ipndm", {"afs": "true"}),
    ],
)
def test_variant_conformance(name, options):
    check_sampler(name, options=options)


@pytest.mark.parametrize("name", [s for s in schedules_of(DIST) if s != "discrete"])
def test_schedule_conformance(name):
    check_schedule(name)
