"""bench-amed's entry module: AMED-Solver, the AMED-Plugin variants (imported when the hook
runs, `bench.register_all`) and `bench fit` (its arguments here, its code deferred)."""

from __future__ import annotations

from pathlib import Path

from bench import deferred, hookimpl, register_all

register_samplers = register_all("bench_amed.samplers:SAMPLERS")


@hookimpl
def register_commands(subparsers):
    add_fit_command(subparsers)


def add_fit_command(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit AMED predictors ahead of time (bench run reuses them)")
    p.add_argument("--samplers", default="all",
                   help="comma list of AMED samplers name[:key=value...], or 'all' (every AMED sampler)")
    p.add_argument("--nfe", default="5,10,20", help="comma list of NFE budgets (default 5,10,20)")
    p.add_argument("--model", default=None, help="model spec name[:arg] (default: bench run's default)")
    p.add_argument("--schedule", default="default",
                   help="schedule name[:key=value]; 'default' is the sampler's own")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", type=Path, default=None, help="directory to write to (default: the AMED cache, "
                   "$BENCH_CACHE/amed, else ~/.cache/sampler-bench/amed)")
    p.add_argument("--force", action="store_true", help="refit even where a valid predictor exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=deferred("bench_amed.command:cmd_fit"))
