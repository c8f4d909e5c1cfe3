"""Registers the skip-tuning modifier and `bench skip-tune` with sampler-bench."""

from __future__ import annotations

from bench import Modifier, hookimpl

from . import modifier, search

SKIP_TUNING = Modifier(
    "skip-tuning",
    modifier.apply,
    "Skip-Tuning (Ma et al., ICML 2024): encoder skips scaled linearly from rho_bottom (innermost) "
    "to rho_top (outermost), no extra NFE; without factors, those `bench skip-tune` stored for the cell",
    options=modifier.OPTIONS,
    takes_cell=True,
)


@hookimpl
def register_modifiers(register):
    register(SKIP_TUNING)


@hookimpl
def register_commands(subparsers):
    search.add_command(subparsers)
