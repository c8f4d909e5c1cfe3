"""Registers the upsample-guidance modifier with sampler-bench."""

from __future__ import annotations

from bench import Modifier, hookimpl

from . import guidance

UPSAMPLE_GUIDANCE = Modifier(
    "upsample-guidance",
    guidance.apply,
    "Upsample guidance (Hwang et al. 2024): sample at m x the trained resolution; weight w on the "
    "noisiest fraction eta adds one low-resolution call at sigma/m (counted in nfe_extra); w=0 is plain",
    options=guidance.OPTIONS,
)


@hookimpl
def register_modifiers(register):
    register(UPSAMPLE_GUIDANCE)
