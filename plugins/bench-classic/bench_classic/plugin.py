"""Registers bench-classic's samplers and schedules with sampler-bench."""

from __future__ import annotations

from bench import Plan, Sampler, Schedule, hookimpl
from bench.errors import Infeasible

from . import samplers, schedules


def plan_one_per_step(nfe: int, options) -> Plan:
    """NFE = steps."""
    return Plan(steps=nfe, nfe=nfe)


def plan_heun(nfe: int, options) -> Plan:
    """EDM's Heun ends with an Euler step to 0: NFE = 2 * steps - 1, odd budgets."""
    if nfe % 2 == 0:
        raise Infeasible(f"heun spends 2 * steps - 1 NFE (EDM's final Euler step): {nfe} is even")
    return Plan(steps=(nfe + 1) // 2, nfe=nfe)


SAMPLERS = [
    Sampler("euler", samplers.sample_euler, plan_one_per_step, "NFE = steps",
            "Euler's method on the probability-flow ODE (1st order)"),
    Sampler("heun", samplers.sample_heun, plan_heun, "NFE = 2*steps - 1 (odd)",
            "Heun's 2nd-order method, EDM Algorithm 1 (Karras et al. 2022)"),
    Sampler("ddim", samplers.sample_ddim, plan_one_per_step, "NFE = steps",
            "DDIM (Song et al. 2021); eta=0 deterministic, eta>0 stochastic",
            default_schedule="time-uniform", options={"eta": 0.0}),
]

SCHEDULES = [
    Schedule("karras", schedules.karras, "Karras et al. (2022) polynomial in sigma^(1/rho)",
             options={"rho": 7.0}),
    Schedule("time-uniform", schedules.time_uniform,
             "VP time-uniform: t^(1/rho) uniform in [eps_s, 1], VP sigma(t) fitted to the range",
             options={"rho": 1.0, "eps_s": 1e-3}),
]


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)


@hookimpl
def register_schedules(register):
    for schedule in SCHEDULES:
        register(schedule)
