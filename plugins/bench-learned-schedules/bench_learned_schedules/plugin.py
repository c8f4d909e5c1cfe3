"""bench-learned-schedules' entry module: the searched schedules GITS, LD3 and DMN (imported
when the hook runs, `bench.register_all`) and `bench search` (its arguments here, its code
deferred)."""

from __future__ import annotations

from pathlib import Path

from bench import deferred, hookimpl, register_all

register_schedules = register_all("bench_learned_schedules.catalog:SCHEDULES")


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("search", help="search learned schedules ahead of time (bench run reuses them)")
    p.add_argument("--schedules", default="gits,ld3,dmn",
                   help="comma list of name[:key=value...] (default all)")
    p.add_argument("--samplers", default="ipndm,dpm++2m,unipc",
                   help="comma list of the samplers that will use them (each is searched for its own)")
    p.add_argument("--nfe", default="5,10,20", help="comma list of NFE budgets (default 5,10,20)")
    p.add_argument("--model", default=None, help="model spec name[:arg] (default: bench run's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=None, help="directory to write to (default: "
                   "$BENCH_CACHE/learned-schedules, else ~/.cache/sampler-bench/learned-schedules)")
    p.add_argument("--force", action="store_true", help="search again even where a valid result exists")
    p.set_defaults(func=deferred("bench_learned_schedules.command:cmd_search"))
