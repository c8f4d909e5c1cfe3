"""Registers the upsample-guidance modifier with sampler-bench (import-light: the
modifier, and torch with it, load when the hook asks for them)."""

from __future__ import annotations

from bench import hookimpl


@hookimpl
def register_modifiers(register):
    from bench import Modifier

    from . import guidance

    register(Modifier(
        "upsample-guidance",
        guidance.apply,
        "Upsample guidance (Hwang et al. 2024): sample at m x the trained resolution; weight w on the "
        "noisiest fraction eta adds one low-resolution call at sigma/m (counted in nfe_extra); w=0 is plain",
        options=guidance.OPTIONS,
    ))
