"""Planning: the num_inference_steps whose diffusers loop calls the network exactly `nfe` times.

diffusers' loop calls the network once per entry of `scheduler.timesteps`, so the planner
measures that length (Heun repeats each inner timestep, PNDM adds its Runge-Kutta warm-up)
rather than assuming a rule; a budget no num_inference_steps meets is Infeasible.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Any

from bench import Plan
from bench.errors import Infeasible, UsageError

from . import timeline

# The values a string option may take (others are refused with a UsageError)
CHOICES = {
    "timestep_spacing": ("linspace", "leading", "trailing"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear", "log_linear"),
    "sigma_schedule": ("karras", "exponential"),
}


def check_options(entry, options: dict[str, Any]) -> None:
    """One-line UsageErrors for option values the scheduler would refuse or misread."""
    where = f"sampler '{entry.name}'"
    for key, allowed in {**CHOICES, **entry.choices}.items():
        if key in entry.options and options.get(key) not in allowed:
            raise UsageError(f"{where} option '{key}': '{options.get(key)}' is not one of "
                             f"{', '.join(allowed)}")
    for key in ("solver_order", "order"):
        if key in entry.options and entry.orders and options.get(key) not in entry.orders:
            raise UsageError(f"{where} option '{key}': {options.get(key)} is not one of "
                             f"{', '.join(map(str, entry.orders))}")
    checks = {
        "steps_offset": lambda v: 0 <= v < 1000,
        "eta": lambda v: math.isfinite(v) and v >= 0,
        "rho": lambda v: v > 0,
        "shift": lambda v: v > 0,
        "sigma_min": lambda v: v is None or (isinstance(v, (int, float)) and v > 0),
        "sigma_max": lambda v: v is None or (isinstance(v, (int, float)) and v > 0),
    }
    for key, ok in checks.items():
        if key in entry.options and not ok(options.get(key)):
            raise UsageError(f"{where} option '{key}': {options.get(key)} is out of range")
    if entry.cls == "UniPCMultistepScheduler" and options.get("solver_type") == "bh1" \
            and options.get("final_sigmas_type") == "zero":
        raise UsageError(f"{where}: diffusers' UniPC bh1 returns NaN on the step to sigma = 0 "
                         "(its B(h) = -h is infinite there); set final_sigmas_type=sigma_min")
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if options.get(k)]
    if len(flags) > 1:
        raise UsageError(f"{where}: set at most one of {', '.join(flags)}")


def freeze(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


@lru_cache(maxsize=4096)
def measure(entry, frozen: tuple[tuple[str, Any], ...], n: int) -> tuple[int, int, bool] | str:
    """(network calls, steps, ends at 0) of num_inference_steps n on the default time axis,
    or why diffusers cannot set n steps."""
    scheduler = timeline.build(entry, dict(frozen))
    try:
        timeline.set_timesteps(scheduler, n)
        sigmas = timeline.grid(entry, scheduler, sigma_max=math.inf)
    except Infeasible as exc:
        return str(exc)
    except Exception as exc:  # e.g. PNDM below 4 steps: numpy broadcasting fails
        return f"{entry.cls}.set_timesteps({n}) fails: {timeline.first_line(exc)}"
    return len(scheduler.timesteps), len(sigmas) - 1, sigmas[-1] == 0


def plan(entry, nfe: int, options: dict[str, Any]) -> Plan:
    """The Plan that spends exactly `nfe` network calls, or Infeasible with the reason."""
    check_options(entry, options)
    timeline.build(entry, options)  # a config diffusers refuses is the user's error
    frozen, why, below, above = freeze(options), None, None, None
    for n in range(1, nfe + 1):
        got = measure(entry, frozen, n)
        if isinstance(got, str):
            why = got
            continue
        count, steps, to_zero = got
        if count == nfe:
            return Plan(steps=steps, nfe=nfe, to_zero=to_zero,
                        options={"num_inference_steps": n, "diffusers": timeline.diffusers_version()},
                        sigmas=partial(timeline.plan_sigmas, entry, dict(options), n))
        if count > nfe:
            above = count
            break
        below = count
    near = " or ".join(str(c) for c in (below, above) if c is not None)
    detail = f"nearest feasible: {near}" if near else (why or "no step count is feasible")
    raise Infeasible(f"{entry.name}: no num_inference_steps gives exactly {nfe} network calls "
                     f"({entry.rule}); {detail}")
