"""Registers bench-classic's samplers and schedules with sampler-bench.

Import-light on purpose: `bench --help` loads every plugin module, so the catalog (and
torch with it) is imported only when a hook asks for it.
"""

from bench import hookimpl


@hookimpl
def register_samplers(register):
    from .catalog import SAMPLERS

    for sampler in SAMPLERS:
        register(sampler)


@hookimpl
def register_schedules(register):
    from .catalog import SCHEDULES

    for schedule in SCHEDULES:
        register(schedule)
