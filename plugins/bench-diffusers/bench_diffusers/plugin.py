"""bench-diffusers' entry module: its samplers, registered from the catalog when the hook runs
(`bench.register_all`): torch comes with the catalog, diffusers only when a sampler plans or
samples."""

from bench import register_all

register_samplers = register_all("bench_diffusers.catalog:samplers")
