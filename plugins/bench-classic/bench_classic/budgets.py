"""NFE budgets: how each bench-classic sampler spends exactly the NFE it is given.

`steps` counts the schedule's intervals. With denoise_to_zero (the default) the schedule
ends at 0 and its last step is one denoise D(x, sigma_min), which is EDM's final Euler
step; without it the schedule stops at sigma_min (diff-sampler's convention). A method
step of cost c spends c NFE, and AFS (Zhou et al. 2024) saves the first call:

    NFE = c * (steps - denoise_to_zero) + denoise_to_zero - afs

`afs=auto` uses AFS only where the parity needs it (2nd-order singlestep solvers at the
other parity, as diff-sampler reaches odd budgets); a budget no setting reaches raises
Infeasible with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bench import Plan
from bench.errors import Infeasible, UsageError
from bench.solvers import plan_steps, switch


def choose(options: Mapping[str, Any], key: str, allowed: tuple) -> Any:
    """The option's value if it is one of `allowed`, else a UsageError naming them."""
    value = options[key]
    if value not in allowed:
        raise UsageError(f"option {key}={value}: use one of {', '.join(map(str, allowed))}")
    return value


def plan_one(nfe: int, options: Mapping[str, Any]) -> Plan:
    """1 NFE per step (Euler, DDIM, ancestral, multistep solvers)."""
    return plan_steps(nfe, options, cost=1)


def plan_two(nfe: int, options: Mapping[str, Any]) -> Plan:
    """2 NFE per step (Heun, DPM-Solver-2); AFS reaches the other parity."""
    return plan_steps(nfe, options, cost=2)


def fast_orders(budget: int) -> tuple[int, ...]:
    """DPM-Solver-fast's orders for a budget of NFE (Lu et al. 2022, Sec. 3.4): third-order
    steps, then one or two lower-order steps so that the orders sum to the budget."""
    if budget <= 0:
        return ()
    k, rest = budget // 3 + 1, budget % 3
    tail = {0: (2, 1), 1: (1,), 2: (2,)}[rest]
    return (3,) * (k - 1 - (rest == 0)) + tail


def plan_dpm_solver_3(nfe: int, options: Mapping[str, Any]) -> Plan:
    """DPM-Solver-3 reaches every budget with DPM-Solver-fast's orders (3, ..., 3, then 2/1)."""
    dtz = bool(options.get("denoise_to_zero", True))
    afs = bool(switch(options, "afs"))
    orders = fast_orders(nfe - dtz + afs)
    if (afs and not orders) or len(orders) + dtz < 1:
        raise Infeasible(f"dpm-solver-3 needs at least {1 + dtz} NFE with afs={afs}")
    return Plan(steps=len(orders) + dtz, nfe=nfe, to_zero=dtz, options={"afs": afs, "orders": orders})


def plan_checked(**allowed: tuple) -> Callable[[int, Mapping[str, Any]], Plan]:
    """A 1-NFE-per-step planner that first checks each named option is one of its allowed values."""

    def plan(nfe: int, options: Mapping[str, Any]) -> Plan:
        for key, values in allowed.items():
            choose(options, key, values)
        return plan_one(nfe, options)

    return plan


def plan_unipc(nfe: int, options: Mapping[str, Any]) -> Plan:
    """UniPC: 1 NFE per step; variant=auto is bh1 below 10 steps, else bh2 (diffusers' advice)."""
    variant = choose(options, "variant", ("auto", "bh1", "bh2"))
    plan = plan_checked(order=(1, 2, 3))(nfe, options)
    if variant == "auto":
        variant = "bh1" if plan.steps < 10 else "bh2"
    return Plan(plan.steps, plan.nfe, plan.to_zero, {**plan.options, "variant": variant})
