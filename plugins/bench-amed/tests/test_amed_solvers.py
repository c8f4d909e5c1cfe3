"""AMED's steps checked against independent solvers, exact ODE solutions and the
conformance suite: the numerics of sampling, apart from any fit."""

from __future__ import annotations

import math

import pytest
import torch
from bench_amed.fit import refine
from bench_amed.samplers import plan_amed
from bench_amed.solvers import sample_amed
from bench_classic.multistep import sample_dpmpp, sample_ipndm
from bench_classic.samplers import sample_dpm_solver, sample_euler
from bench_classic.schedules import karras

from bench import SampleNoise
from bench.errors import Infeasible
from bench.testing import (
    Case,
    check_batch_invariance,
    check_determinism,
    check_nfe,
    check_planner,
    check_shapes,
    gaussian,
    mixture,
    parse_command,
    samplers_of,
)

NAMES = ["amed-solver", "amed-plugin-euler", "amed-plugin-ipndm", "amed-plugin-dpm++2m"]


def test_the_distribution_registers_every_sampler_and_the_fit_command(registry):
    assert samplers_of("bench-amed") == NAMES
    for name in NAMES:
        sampler = registry.get("samplers", name)
        assert registry.version_of("samplers", name).startswith("bench-amed==")
        assert sampler.prepare is not None and sampler.default_schedule == "karras"
    args = parse_command(["fit", "--nfe", "5"], registry)
    assert args.nfe == "5" and callable(args.func)


@pytest.mark.parametrize("nfe, steps, afs", [(1, 1, True), (3, 2, True), (5, 3, True), (10, 5, False)])
def test_planner_uses_afs_for_odd_budgets_and_ends_at_sigma_min(nfe, steps, afs):
    plan = plan_amed(nfe, {"afs": "auto"})
    assert (plan.steps, plan.nfe, plan.to_zero, plan.options["afs"]) == (steps, nfe, False, afs)
    assert 2 * plan.steps - plan.options["afs"] == nfe


def test_a_budget_of_the_other_parity_is_infeasible_when_afs_is_fixed():
    with pytest.raises(Infeasible, match="afs=auto reaches it"):
        plan_amed(5, {"afs": False})
    with pytest.raises(Infeasible, match="afs=auto reaches it"):
        plan_amed(6, {"afs": True})
    assert plan_amed(6, {"afs": False}).steps == 3 and plan_amed(5, {"afs": True}).steps == 3


def midpoints(sigmas):
    """The schedule with each interval's geometric midpoint inserted (r = 1/2)."""
    mids = (sigmas[:-1].double() * sigmas[1:].double()).sqrt().float()
    return torch.stack([sigmas[:-1], mids], 1).reshape(-1).tolist() + [float(sigmas[-1])]


@pytest.mark.parametrize("afs", [False, True])
def test_unfitted_steps_are_the_base_solvers_on_the_midpoint_grid(afs):
    """Without a predictor (r = 1/2, c = a = 1) each variant is a known solver: AMED-Solver is
    DPM-Solver-2, each AMED-Plugin is its base on the schedule with midpoints inserted;
    checked against bench-classic's independent implementations."""
    model = mixture()
    sigmas = karras(4, model.sigma_min, model.sigma_max, to_zero=False)
    x = SampleNoise(0, range(8), model.shape, "cpu")() * sigmas[0]
    fine = torch.tensor(midpoints(sigmas))
    expected = {
        "amed": sample_dpm_solver(model, x, sigmas, order=2, afs=afs),
        "euler": sample_euler(model, x, fine, afs=afs),
        "ipndm": sample_ipndm(model, x, fine, order=2, afs=afs),
        "dpm++2m": sample_dpmpp(model, x, fine, order=2, lower_order_final=True, afs=afs),
    }
    for base, reference in expected.items():
        ours = sample_amed(model, x, sigmas, base=base, afs=afs)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4, msg=f"{base} (afs={afs})")


def test_teacher_grid_refines_the_polynomial_schedule_exactly():
    """m sigmas inside each interval, uniform in sigma^(1/7): for a karras schedule that is
    the karras schedule with (m + 1) times the intervals, through the same sigmas."""
    coarse = karras(4, 0.002, 80.0, to_zero=False).double()
    fine = refine(coarse, 2)
    torch.testing.assert_close(fine, karras(12, 0.002, 80.0, to_zero=False).double(), rtol=1e-5, atol=0)
    assert torch.equal(fine[::3], coarse)


@pytest.mark.parametrize("base, order", [("amed", 2), ("euler", 1), ("dpm++2m", 2), ("ipndm", 2)])
def test_measured_convergence_order(base, order):
    """On a single Gaussian the ODE has a closed-form solution; the error of the unfitted
    step, 32 -> 64 intervals, falls at the base's order. (iPNDM's fixed Adams-Bashforth
    coefficients assume equal steps; with the midpoints inserted, step sizes alternate and
    the measured order is 2.)"""
    model = gaussian()
    x_T = SampleNoise(0, range(16), model.shape, "cpu")().double() * model.sigma_max
    errors = []
    for n in (32, 64):
        sigmas = karras(n, model.sigma_min, model.sigma_max, to_zero=False).double()
        exact = model.ode_solution(x_T, model.sigma_max, float(sigmas[-1]))
        x0 = sample_amed(model, x_T, sigmas, base=base)
        errors.append(float((x0 - exact).pow(2).mean().sqrt()))
    measured = math.log2(errors[0] / errors[1])
    assert measured > order - 0.3, f"{base}: measured order {measured:.2f} ({errors})"


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name, tiny_fit):
    """The host's conformance checks with a fit small enough for a unit test: exact planning,
    counted NFE, shapes, determinism, batch invariance. (Convergence is checked above on the
    step itself: every budget has its own fit, so errors across budgets mix predictors.)"""
    case = Case.of(name, tiny_fit)
    feasible = check_planner(case, range(1, 8))
    assert feasible == list(range(1, 8))
    check_nfe(case, feasible)
    check_shapes(case, 5)
    check_determinism(case, 5)
    check_batch_invariance(case, 5)
    assert case.solver(5).prepared["predictor_source"] == "fitted"
