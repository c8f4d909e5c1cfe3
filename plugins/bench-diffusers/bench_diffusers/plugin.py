"""Registers bench-diffusers' samplers with sampler-bench.

Import-light on purpose: `bench --help` loads every plugin module, so the catalog (torch
with it) is imported only when the hook runs, and diffusers only when a sampler plans or
samples.
"""

from bench import hookimpl


@hookimpl
def register_samplers(register):
    from .catalog import samplers

    for sampler in samplers():
        register(sampler)
