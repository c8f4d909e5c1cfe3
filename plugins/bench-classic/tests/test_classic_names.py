"""k-diffusion's names as aliases, and the closest-match hints of unknown names.

Aliases are only given where k-diffusion's function is the same method as ours
(test_classic_kdiffusion_crosscheck runs both where k_diffusion is importable); the names it
has for other methods are unknown here, and their error gives no hint that would point to a
different method.
"""

from __future__ import annotations

import pytest

from bench.errors import UsageError, unknown

# k-diffusion's sampler and schedule names that resolve here, and what they resolve to
KDIFFUSION_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler-ancestral",
    "heun": "heun",
    "dpm_2": "dpm-solver-2",
    "dpm_2_ancestral": "dpm-2-ancestral",
    "lms": "lms",
    "dpmpp_2s_ancestral": "dpm++2s-ancestral",
    "dpmpp_sde": "dpm++sde",
    "dpmpp_2m": "dpm++2m",
    "dpmpp_2m_sde": "dpm++2m-sde",
    "dpmpp_3m_sde": "dpm++3m-sde",
}
KDIFFUSION_SCHEDULES = {"karras": "karras", "exponential": "logsnr"}
# k-diffusion names of methods registered under no name (README: why)
NOT_ALIASED = [
    ("samplers", "dpm_fast"),
    ("samplers", "dpm_adaptive"),
    ("schedules", "vp"),
    ("schedules", "polyexponential"),
]


@pytest.mark.parametrize(
    "kind, alias, name",
    [("samplers", a, n) for a, n in KDIFFUSION_SAMPLERS.items()]
    + [("schedules", a, n) for a, n in KDIFFUSION_SCHEDULES.items()],
)
def test_k_diffusion_names_resolve(registry, kind, alias, name):
    assert registry.get(kind, alias) is registry.get(kind, name)
    assert registry.canonical(kind, alias) == name


@pytest.mark.parametrize("kind, name", NOT_ALIASED)
def test_other_k_diffusion_names_are_unknown_without_a_hint(registry, kind, name):
    with pytest.raises(UsageError) as info:
        registry.get(kind, name)
    assert "closest" not in str(info.value)


@pytest.mark.parametrize(
    "kind, typed, closest",
    [
        ("samplers", "eulr", "euler"),
        ("samplers", "dpmpp2m", "dpm++2m"),
        ("samplers", "DPM++2M", "dpm++2m"),
        ("samplers", "dpmpp-2m-sde", "dpm++2m-sde"),
        ("samplers", "Euler_Ancestral", "euler-ancestral"),
        ("samplers", "eulr_ancestrl", "euler-ancestral"),
        ("samplers", "huen", "heun"),
        ("samplers", "dpmpp_2s_ancestrl", "dpm++2s-ancestral"),
        ("samplers", "dpm2", "dpm_2 = dpm-solver-2"),
        ("samplers", "uni_pc", "unipc"),
        ("schedules", "karas", "karras"),
        ("schedules", "Exponential", "exponential = logsnr"),
        ("schedules", "time_uniform", "time-uniform"),
    ],
)
def test_misspelt_names_get_the_right_hint(registry, kind, typed, closest):
    with pytest.raises(UsageError, match="closest") as info:
        registry.get(kind, typed)
    assert f"(closest: {closest});" in str(info.value)


@pytest.mark.parametrize(
    "kind, typed",
    [
        ("samplers", "dpmpp_2s"),  # DPM-Solver++(2S), not its ancestral version
        ("samplers", "dpm++2m_ode"),  # an ODE, not the SDE
        ("samplers", "dpmpp_4m"),  # another order
        ("samplers", "euler_a"),
        ("samplers", "pndm"),  # PNDM, not iPNDM
        ("samplers", "plms"),  # PLMS, not LMS
        ("schedules", "polyexponential"),
        ("schedules", "logsnr2"),
    ],
)
def test_other_methods_get_no_hint(registry, kind, typed):
    with pytest.raises(UsageError) as info:
        registry.get(kind, typed)
    assert "closest" not in str(info.value)


@pytest.mark.parametrize(
    "typed, known",
    [
        ("dpmpp_sde", ["dpm++2m-sde", "euler"]),  # the singlestep SDE solver, not the 2M one
        ("polynomial", ["exponential", "karras"]),
        ("exponential", ["polynomial", "karras"]),
        ("ddpm", ["ddim", "euler"]),  # a short word one letter off is another word
        ("dpm++2s", ["dpm++2m", "dpm++3m"]),
    ],
)
def test_no_hint_where_only_a_different_method_is_known(typed, known):
    assert "closest" not in str(unknown("sampler", typed, known))


def test_hints_consider_aliases_and_give_none_when_two_items_fit():
    aliases = {"dpmpp_2m": "dpm++2m", "dpm_2": "dpm-solver-2"}
    known = ["dpm++2m", "dpm-solver-2", "euler"]
    assert "(closest: dpm++2m);" in str(unknown("sampler", "DPMPP-2M", known, aliases))
    assert "(closest: dpm_2 = dpm-solver-2);" in str(unknown("sampler", "DPM-2", known, aliases))
    # Equally close to two different items: no hint
    assert "closest" not in str(unknown("sampler", "eulerr", ["euler", "eulerx"]))
    # A trailing number one known name alone adds is completed (a preset's resolution)
    presets = ["ddpm-cifar10-32", "ddpm-cat-256"]
    assert "(closest: ddpm-cifar10-32);" in str(unknown("preset", "ddpm-cifar10", presets))
    assert "closest" not in str(unknown("preset", "ddpm-cat", ["ddpm-cat-256", "ddpm-cat-64"]))
