"""Registers AMED-Solver, the AMED-Plugin variants and `bench fit` with sampler-bench."""

from __future__ import annotations

from bench import hookimpl

from . import command
from .samplers import SAMPLERS


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)


@hookimpl
def register_commands(subparsers):
    command.add_fit_command(subparsers)
