"""The registered AMED samplers: planner, options and the prepare stage of each."""

from __future__ import annotations

from functools import partial

from bench import Plan, Sampler
from bench.solvers import plan_steps

from .prepare import estimate, prepare
from .solvers import sample_amed

# Options every AMED sampler has: the budget's AFS, the predictor's input, the fit
COMMON = {
    "afs": "auto",  # AFS where the parity needs it (odd budgets, as in the paper), true or false
    "predictor": "auto",  # auto (bottleneck when the model has one), bottleneck or sigma-only
    "teacher": "heun",
    "teacher_steps": 32,
    "fit_samples": 1000,
    "fit_batch": 25,
    "fit_epochs": 2,
    "fit_lr": 1e-2,
    "fit_loss": "auto",  # step (the paper's), trajectory, or auto (trajectory for multistep bases)
    "fit_seed": 20240601,
    "scale_dir": 0.01,
    "scale_time": 0.2,
}

NFE_RULE = "NFE = 2*steps - afs (afs=auto: AFS on odd budgets)"


def plan_amed(nfe: int, options) -> Plan:
    """Two calls per interval, ending at sigma_min (the paper's accounting); AFS saves the
    first call, which is how odd budgets are met. bench-classic's planner, without the
    denoise to zero."""
    return plan_steps(nfe, {**options, "denoise_to_zero": False}, cost=2)


BASES: dict[str, str] = {}  # sampler name -> its base in `solvers.make_base`


def amed_sampler(name: str, base: str, description: str, **extra) -> Sampler:
    """A registered AMED sampler over `base`; its prepare loads or fits the predictor."""
    BASES[name] = base
    return Sampler(
        name,
        partial(sample_amed, base=base),
        plan_amed,
        NFE_RULE,
        description,
        options={**COMMON, **extra},
        prepare=partial(prepare, name, base),
        estimate=partial(estimate, name, base),
    )


SAMPLERS = [
    amed_sampler(
        "amed-solver", "amed", "AMED-Solver (Zhou et al. 2024): learned mean-value step, 2 NFE per interval"
    ),
    amed_sampler(
        "amed-plugin-euler",
        "euler",
        "AMED-Plugin on Euler: learned intermediate point, Euler update twice per interval",
    ),
    amed_sampler(
        "amed-plugin-ipndm",
        "ipndm",
        "AMED-Plugin on iPNDM: learned intermediate point, Adams-Bashforth update twice",
        max_order=2,
    ),
    amed_sampler(
        "amed-plugin-dpm++2m",
        "dpm++2m",
        "AMED-Plugin on DPM-Solver++(2M): learned intermediate point, 2M update twice",
        lower_order_final=True,
        scale_dir=0.05,
    ),
]
