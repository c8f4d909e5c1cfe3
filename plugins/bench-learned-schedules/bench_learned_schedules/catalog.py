"""The registered schedules: GITS, LD3 and DMN, each with its search stage and estimate."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from bench import Schedule

from . import search

DESCRIPTIONS = {
    "gits": "GITS (Chen et al. 2024): DP over the local step errors along a teacher trajectory",
    "ld3": "LD3 (Tong et al. 2025): steps learned by gradient descent through the solver to match a teacher",
    "dmn": "DMN (Xue et al. 2024): data-free steps minimising the multistep solver's error bound",
}


# The pairings `bench run --samplers all` runs (their digits fits are committed): each
# method's own in its paper (iPNDM + GITS, UniPC / DPM-Solver++ + DMN) and LD3 with the
# solvers it improved most on digits (README, evidence)
FEATURED = {"gits": ("ipndm", "unipc"), "ld3": ("unipc", "dpm++2m", "ipndm"), "dmn": ("unipc", "dpm++2m")}


def learned(name: str) -> Schedule:
    """A searched schedule: options are `solver` (auto: the cell's sampler) and the search's own."""
    options = {"solver": "auto", **asdict(search.OPTION_TYPES[name]())}
    return Schedule(
        name,
        search.sigmas_fn(name),
        DESCRIPTIONS[name],
        options=options,
        fit=partial(search.fit, name),
        estimate=partial(search.estimate, name),
        featured=FEATURED[name],
    )


SCHEDULES = [learned(name) for name in ("gits", "ld3", "dmn")]
