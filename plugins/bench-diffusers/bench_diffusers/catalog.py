"""bench-diffusers' samplers: one per diffusers scheduler, as the plugin registers them.

Each entry names the diffusers class, the kind of state it steps (which fixes how a bench
Denoiser is turned into the model output it wants, see `bench_diffusers.drive`), the
scheduler config keys a user would set and the step() arguments, all at diffusers' own
defaults. Nothing here imports diffusers: a scheduler the installed diffusers lacks is
found by its module file and skipped.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import Sampler

from . import budget, drive

# Config keys shared by the discrete-time (DDPM-axis) schedulers
SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}
SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
MULTISTEP = {"solver_order": 2, "lower_order_final": True}
EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_schedule": "karras", "rho": 7.0}

ONE = "NFE = num_inference_steps"


@dataclass(frozen=True, eq=False)  # hashed by identity: the planner caches per entry
class Entry:
    """One diffusers scheduler as a bench sampler.

    `kind` is the state the scheduler steps: "vp" (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps on
    DDPM timesteps, eps wanted), "k" (k-diffusion style x = x0 + sigma eps, eps wanted on the
    input scaled by scale_model_input), "edm" (EDM preconditioned output wanted) or "flow"
    (x_t = (1 - s) x0 + s eps, velocity wanted). `config` holds the scheduler config keys
    offered as options, `step` the step() arguments; `choices` adds to budget.CHOICES;
    `variance_noise` names the step() option whose value turns diffusers' variance_noise on
    (the other stochastic variants draw through the scheduler module's randn_tensor).
    """

    name: str
    cls: str
    module: str
    kind: str
    rule: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    step: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    orders: tuple[int, ...] = ()  # allowed values of solver_order / order
    stochastic: bool = False
    noisy: tuple[tuple[str, Any], ...] = ()  # (option, values that make it draw noise)

    @property
    def options(self) -> dict[str, Any]:
        return {**self.config, **self.step}

    def draws_noise(self, options: dict[str, Any]) -> bool:
        """Whether these options make the scheduler stochastic."""
        return self.stochastic or any(
            (options.get(key) in values) if isinstance(values, tuple) else bool(values(options.get(key)))
            for key, values in self.noisy
        )


SDE = ("sde-dpmsolver", "sde-dpmsolver++")

ENTRIES = [
    Entry(
        "diffusers-dpmsolver-multistep", "DPMSolverMultistepScheduler", "scheduling_dpmsolver_multistep",
        "vp", ONE,
        "diffusers' DPMSolverMultistepScheduler: DPM-Solver++(2M) by default (Lu et al. 2022b)",
        config={**MULTISTEP, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "euler_at_final": False, **SIGMAS, "use_lu_lambdas": False, "final_sigmas_type": "zero",
                "lambda_min_clipped": -math.inf, **SPACING},
        choices={"algorithm_type": ("dpmsolver++", "dpmsolver", *SDE), "solver_type": ("midpoint", "heun")},
        orders=(1, 2, 3), noisy=(("algorithm_type", SDE),),
    ),
    Entry(
        "diffusers-dpmsolver-multistep-sde", "DPMSolverMultistepScheduler", "scheduling_dpmsolver_multistep",
        "vp", ONE,
        "diffusers' DPMSolverMultistepScheduler with algorithm_type=sde-dpmsolver++ (SDE-DPM-Solver++(2M))",
        config={**MULTISTEP, "algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint",
                "euler_at_final": False, **SIGMAS, "final_sigmas_type": "zero", **SPACING},
        choices={"algorithm_type": SDE, "solver_type": ("midpoint", "heun")},
        orders=(1, 2, 3), stochastic=True,
    ),
    Entry(
        "diffusers-dpmsolver-singlestep", "DPMSolverSinglestepScheduler", "scheduling_dpmsolver_singlestep",
        "vp", f"{ONE} (solver_order groups the calls into single steps)",
        "diffusers' DPMSolverSinglestepScheduler: singlestep DPM-Solver(++) (Lu et al. 2022)",
        config={"solver_order": 2, "lower_order_final": False, "algorithm_type": "dpmsolver++",
                "solver_type": "midpoint", **SIGMAS, "final_sigmas_type": "zero"},
        choices={"algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"),
                 "solver_type": ("midpoint", "heun")},
        orders=(1, 2, 3), noisy=(("algorithm_type", ("sde-dpmsolver++",)),),
    ),
    Entry(
        "diffusers-unipc", "UniPCMultistepScheduler", "scheduling_unipc_multistep", "vp", ONE,
        "diffusers' UniPCMultistepScheduler: UniPC predictor-corrector, bh2 (Zhao et al. 2023)",
        config={**MULTISTEP, "solver_type": "bh2", "predict_x0": True, **SIGMAS,
                "final_sigmas_type": "zero", **SPACING},
        choices={"solver_type": ("bh1", "bh2")}, orders=(1, 2, 3),
    ),
    Entry(
        "diffusers-deis", "DEISMultistepScheduler", "scheduling_deis_multistep", "vp", ONE,
        "diffusers' DEISMultistepScheduler: DEIS multistep, logrho (Zhang & Chen 2023)",
        config={**MULTISTEP, **SIGMAS, **SPACING},  # diffusers has only algorithm deis, solver logrho
        orders=(1, 2, 3),
    ),
    Entry(
        "diffusers-euler", "EulerDiscreteScheduler", "scheduling_euler_discrete", "k", ONE,
        "diffusers' EulerDiscreteScheduler: Euler on the sigma axis (Karras et al. 2022)",
        config={**SPACING, **SIGMAS, "interpolation_type": "linear", "final_sigmas_type": "zero",
                "sigma_min": None, "sigma_max": None},
    ),
    Entry(
        "diffusers-euler-ancestral", "EulerAncestralDiscreteScheduler", "scheduling_euler_ancestral_discrete",
        "k", ONE, "diffusers' EulerAncestralDiscreteScheduler: k-diffusion's Euler ancestral",
        config={**SPACING}, stochastic=True,
    ),
    Entry(
        "diffusers-heun", "HeunDiscreteScheduler", "scheduling_heun_discrete", "k",
        "NFE = 2*num_inference_steps - 1 (the step to sigma = 0 is an Euler step)",
        "diffusers' HeunDiscreteScheduler: EDM Algorithm 1 (Karras et al. 2022)",
        config={**SPACING, **SIGMAS},
    ),
    Entry(
        "diffusers-ddim", "DDIMScheduler", "scheduling_ddim", "vp", ONE,
        "diffusers' DDIMScheduler (Song et al. 2021); eta > 0 is stochastic",
        # clip_sample: diffusers' class default is True (data in [-1, 1]); off here, see README
        config={"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                "clip_sample": False},
        step={"eta": 0.0}, noisy=(("eta", lambda eta: eta > 0),),
    ),
    Entry(
        "diffusers-pndm", "PNDMScheduler", "scheduling_pndm", "vp",
        "NFE = num_inference_steps + 9 for num_inference_steps >= 4 (3 Runge-Kutta warm-up steps "
        "of 4 calls); num_inference_steps + 1 with skip_prk_steps=true",
        "diffusers' PNDMScheduler: pseudo numerical methods, PRK warm-up then PLMS (Liu et al. 2022)",
        config={"skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
                "steps_offset": 0},
    ),
    Entry(
        "diffusers-lms", "LMSDiscreteScheduler", "scheduling_lms_discrete", "k", ONE,
        "diffusers' LMSDiscreteScheduler: linear multistep on the sigma axis (k-diffusion's LMS)",
        config={**SPACING, **SIGMAS}, step={"order": 4}, orders=(1, 2, 3, 4),
    ),
    Entry(
        "diffusers-edm-euler", "EDMEulerScheduler", "scheduling_edm_euler", "edm", ONE,
        "diffusers' EDMEulerScheduler: Euler on EDM's sigmas (Karras et al. 2022)",
        config={**EDM, "final_sigmas_type": "zero"},
    ),
    Entry(
        "diffusers-edm-dpmsolver-multistep", "EDMDPMSolverMultistepScheduler",
        "scheduling_edm_dpmsolver_multistep", "edm", ONE,
        "diffusers' EDMDPMSolverMultistepScheduler: DPM-Solver++(2M) on EDM's sigmas",
        config={**EDM, **MULTISTEP, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "euler_at_final": False, "final_sigmas_type": "zero"},
        choices={"algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_type": ("midpoint", "heun")},
        orders=(1, 2, 3), noisy=(("algorithm_type", ("sde-dpmsolver++",)),),
    ),
    Entry(
        "diffusers-flow-match-euler", "FlowMatchEulerDiscreteScheduler",
        "scheduling_flow_match_euler_discrete", "flow", ONE,
        "diffusers' FlowMatchEulerDiscreteScheduler: Euler on a flow-matching model's velocity "
        "(models that declare themselves flow models only)",
        config={"shift": 1.0, **SIGMAS, "stochastic_sampling": False},
        noisy=(("stochastic_sampling", lambda on: on),),
    ),
]


def available(entry: Entry) -> bool:
    """Whether the installed diffusers ships the scheduler's module (found without importing
    diffusers, which is slow to import)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return False
    files = (Path(p) / "schedulers" / f"{entry.module}.py" for p in spec.submodule_search_locations)
    return any(f.is_file() for f in files)


def sampler(entry: Entry) -> Sampler:
    """The bench Sampler that drives `entry`'s scheduler."""
    return Sampler(
        entry.name,
        partial(drive.sample, entry),
        partial(budget.plan, entry),
        entry.rule,
        entry.description,
        stochastic=entry.stochastic,
        options=entry.options,
        stochastic_when=entry.draws_noise,
        aliases=() if entry.name.endswith("-sde") else (entry.cls.lower(),),
    )


def samplers() -> list[Sampler]:
    """Every entry the installed diffusers supports (a missing scheduler is skipped)."""
    return [sampler(entry) for entry in ENTRIES if available(entry)]
