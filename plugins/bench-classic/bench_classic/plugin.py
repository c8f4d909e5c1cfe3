"""bench-classic's entry module: its samplers and schedules, registered from the catalog when
the hooks run (`bench.register_all`), so that loading it imports no torch."""

from bench import register_all

register_samplers = register_all("bench_classic.catalog:SAMPLERS")
register_schedules = register_all("bench_classic.catalog:SCHEDULES")
