"""bench-classic's samplers and schedules, as the plugin registers them.

Defaults follow ALGORITHMS.md and the papers: each sampler runs at its recommended
configuration and default schedule when the user names none (`--samplers all`).
"""

from __future__ import annotations

import math
from functools import partial

from bench import Sampler, Schedule

from . import ancestral, budgets, multistep, samplers, schedules, sde

# Options shared by the deterministic ODE solvers. The protocol (README): every schedule
# stops at sigma_min, as diff-sampler's do; denoise_to_zero=true adds EDM's final call
# D(x, sigma_min), which measured worse or equal at 3-20 NFE on digits and the mixture
ODE = {"afs": "auto", "denoise_to_zero": False}
CHURN = {"churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
# The stochastic samplers' noise: eta scales each step's fresh noise (eta=0 is the ODE solver
# they reduce to), s_noise its standard deviation
NOISE = {"eta": 1.0, "s_noise": 1.0}
def draws_noise(options) -> bool:
    """Whether a sampler's options make it draw fresh noise: EDM's churn, or eta > 0 with a
    nonzero noise scale (eta=0 is the ODE solver the stochastic samplers reduce to)."""
    return options.get("churn", 0) > 0 or (options.get("eta", 0) > 0 and options.get("s_noise", 1) > 0)


ONE = "NFE = steps - afs"
TWO = "NFE = 2*steps - afs (2*steps - 1 - afs with denoise_to_zero=true: the step to 0 costs 1)"


def one_call_stochastic(name: str, sample, description: str, **more) -> Sampler:
    """A sampler with fresh noise at each of its one-call steps: NFE = steps, no final denoise."""
    return Sampler(name, sample, budgets.plan_one, "NFE = steps", description, stochastic=True,
                   options={**NOISE, "denoise_to_zero": False}, stochastic_when=draws_noise, **more)


def two_call_ancestral(name: str, sample, description: str, alias: str) -> Sampler:
    """Ancestral sampling with a two-call singlestep solver's steps (k-diffusion): the budget
    rule of the two-call solvers, their options and the noise."""
    return Sampler(name, sample, ancestral.plan_two_ancestral, TWO, description, stochastic=True,
                   options={**NOISE, **ODE}, aliases=(alias,), stochastic_when=draws_noise)


def churned(name: str, sample, plan, rule: str, description: str) -> Sampler:
    """An ODE solver with EDM's optional churn (Algorithm 2): deterministic unless churn > 0."""
    return Sampler(name, sample, plan, rule, description, options={**ODE, **CHURN},
                   stochastic_when=draws_noise)


SAMPLERS = [
    churned("euler", samplers.sample_euler, budgets.plan_one, ONE,
            "Euler's method on the probability-flow ODE (Karras et al. 2022), optional EDM churn"),
    one_call_stochastic("euler-ancestral", samplers.sample_euler_ancestral,
                        "Euler ancestral (k-diffusion): DDIM's stochastic step on the sigma axis, eta=1",
                        aliases=("euler_ancestral",)),
    Sampler(
        "ddim",
        samplers.sample_euler_ancestral,
        budgets.plan_one,
        "NFE = steps",
        "DDIM (Song et al. 2021); eta=0 deterministic (= Euler), eta>0 stochastic",
        default_schedule="time-uniform",
        options={"eta": 0.0, "denoise_to_zero": False},
        stochastic_when=draws_noise,
    ),
    churned("heun", samplers.sample_heun, budgets.plan_two, TWO,
            "Heun's 2nd-order method, EDM Algorithm 1 (Karras et al. 2022); churn gives Algorithm 2"),
    Sampler(
        "dpm-solver-2",
        partial(samplers.sample_dpm_solver, order=2),
        budgets.plan_two,
        TWO,
        "DPM-Solver-2, singlestep, midpoint in log sigma (Lu et al. 2022)",
        options=ODE,
        aliases=("dpm_2",),
    ),
    Sampler(
        "dpm-solver-3",
        partial(samplers.sample_dpm_solver, order=3),
        budgets.plan_dpm_solver_3,
        "NFE = sum of step orders (3,..,3 then 2/1, DPM-Solver-fast) + 1 for the step to 0 - afs",
        "DPM-Solver-3, singlestep (Lu et al. 2022), DPM-Solver-fast's orders for any budget",
        default_schedule="logsnr",
        options=ODE,
    ),
    Sampler(
        "dpm++2m",
        partial(multistep.sample_dpmpp, order=2),
        budgets.plan_one,
        ONE,
        "DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022b)",
        default_schedule="logsnr",
        options={**ODE, "lower_order_final": True},
        aliases=("dpmpp_2m",),
    ),
    Sampler(
        "dpm++3m",
        partial(multistep.sample_dpmpp, order=3),
        budgets.plan_checked(d2=("reference", "taylor")),
        ONE,
        "DPM-Solver++(3M), multistep, data prediction (Lu et al. 2022b); d2=taylor makes the "
        "third-order term exact for quadratics",
        default_schedule="logsnr",
        options={**ODE, "lower_order_final": True, "d2": "reference"},
    ),
    Sampler(
        "dpm++2m-sde",
        multistep.sample_dpmpp_2m_sde,
        budgets.plan_checked(solver_type=("midpoint", "heun")),
        "NFE = steps",
        "DPM-Solver++(2M) SDE (Lu et al. 2022b; k-diffusion), fresh noise each step",
        default_schedule="logsnr",
        stochastic=True,
        options={**NOISE, "solver_type": "midpoint", "denoise_to_zero": False},
        stochastic_when=draws_noise,
        aliases=("dpmpp_2m_sde",),
    ),
    Sampler(
        "unipc",
        multistep.sample_unipc,
        budgets.plan_unipc,
        ONE,
        "UniPC (Zhao et al. 2023): UniP predictor + UniC corrector; bh2 as diff-sampler runs it "
        "(variant=auto: bh1 below 10 steps, diffusers' advice for unconditional models)",
        default_schedule="logsnr",
        options={"order": 3, "variant": "bh2", "lower_order_final": True, **ODE},
    ),
    Sampler(
        "ipndm",
        multistep.sample_ipndm,
        budgets.plan_checked(order=(1, 2, 3, 4)),
        ONE,
        "iPNDM (Zhang & Chen 2023): Adams-Bashforth of order <= 4 on d, lower-order warm start",
        options={"order": 4, **ODE},
    ),
    Sampler(
        "deis",
        multistep.sample_deis,
        budgets.plan_checked(order=(1, 2, 3, 4), mode=("tab", "rhoab")),
        ONE,
        "DEIS (Zhang & Chen 2023): tAB (or rhoAB) exponential integrator, order 4 = tAB3",
        default_schedule="time-uniform:rho=2",
        options={"order": 4, "mode": "tab", **ODE},
    ),
    Sampler(
        "lms",
        partial(multistep.sample_deis, mode="rhoab"),
        budgets.plan_checked(order=(1, 2, 3, 4)),
        ONE,
        "Linear multistep (k-diffusion's lms): variable-step Adams-Bashforth in sigma, i.e. "
        "deis:mode=rhoab on karras steps",
        options={"order": 4, **ODE},
    ),
    two_call_ancestral("dpm-2-ancestral", ancestral.sample_dpm_2_ancestral,
                       "Ancestral sampling with DPM-Solver-2 steps (k-diffusion); eta=0 is dpm-solver-2",
                       "dpm_2_ancestral"),
    two_call_ancestral("dpm++2s-ancestral", ancestral.sample_dpmpp_2s_ancestral,
                       "Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b; k-diffusion)",
                       "dpmpp_2s_ancestral"),
    Sampler(
        "dpm++sde",
        sde.sample_dpmpp_sde,
        sde.plan_sde,
        TWO,
        "DPM-Solver++ SDE, singlestep (k-diffusion's dpmpp_sde), Brownian increments drawn "
        "from the noise stream; eta=0 is DPM-Solver++(2S)",
        stochastic=True,
        options={**NOISE, "r": 0.5, **ODE},
        stochastic_when=draws_noise,
        aliases=("dpmpp_sde",),
    ),
    one_call_stochastic("dpm++3m-sde", sde.sample_dpmpp_3m_sde,
                        "DPM-Solver++(3M) SDE (k-diffusion), fresh noise each step; eta=0 is the ODE solver",
                        default_schedule="logsnr", aliases=("dpmpp_3m_sde",)),
    Sampler(
        "ddpm",
        ancestral.sample_ddpm,
        budgets.plan_checked(variance=("small", "large")),
        "NFE = steps",
        "DDPM ancestral sampling (Ho et al. 2020): the posterior q(x_next | x, x0) step, variance "
        "beta_tilde (small) or beta (large); on trained timesteps of discrete-time models",
        default_schedule="time-uniform",
        stochastic=True,
        options={"variance": "small", "denoise_to_zero": False},
    ),
]

SCHEDULES = [
    Schedule(
        "karras", schedules.karras, "Karras et al. (2022) polynomial in sigma^(1/rho)", options={"rho": 7.0}
    ),
    Schedule(
        "polynomial", schedules.karras, "the karras schedule under diff-sampler's name", options={"rho": 7.0}
    ),
    Schedule(
        "logsnr",
        schedules.logsnr,
        "uniform in log sigma (log-SNR), as DPM-Solver steps; k-diffusion's exponential",
        aliases=("exponential",),
    ),
    Schedule(
        "time-uniform",
        schedules.time_uniform,
        "VP time-uniform: t^(1/rho) uniform in [eps_s, 1], VP sigma(t) fitted to the range",
        options={"rho": 1.0, "eps_s": 1e-3},
    ),
    Schedule(
        "flow",
        schedules.flow,
        "flow matching: uniform in t = sigma / (1 + sigma) (diffusers' FlowMatchEuler), SD3's shift",
        options={"shift": 1.0},
    ),
    Schedule(
        "discrete",
        schedules.discrete,
        "trained timesteps of a discrete-time model, diffusers' trailing/leading/linspace spacing",
        options={"spacing": "trailing", "offset": 0},
    ),
]
