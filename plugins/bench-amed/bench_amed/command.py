"""`bench fit`: fit AMED predictors ahead of time, with a progress bar.

    bench fit --model digits --nfe 5,10,20                  # every AMED sampler, into the cache
    bench fit --samplers amed-plugin-ipndm:fit_samples=2000 --nfe 5 --out DIR --force

It fits exactly what `bench run` would fit for the same model, schedule, budget and
sampler options (the same cache key), so a later run loads the result. Deterministic
given each sampler's `fit_seed`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.contracts import resolve_options
from bench.errors import Infeasible, UsageError
from bench.nfe import CountingDenoiser
from bench.runner import Spec, load_model, make_sigmas, parse_nfe

from . import cache
from .prepare import prepare
from .samplers import BASES

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def add_fit_command(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit AMED predictors ahead of time (bench run reuses them)")
    p.add_argument(
        "--samplers",
        default="all",
        help="comma list of AMED samplers name[:key=value...], or 'all' (every AMED sampler)",
    )
    p.add_argument("--nfe", default="5,10,20", help="comma list of NFE budgets (default 5,10,20)")
    p.add_argument("--model", default=None, help="model spec name[:arg] (default: bench run's default)")
    p.add_argument(
        "--schedule", default="default", help="schedule name[:key=value]; 'default' is the sampler's own"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory to write to (default the cache, {cache.cache_dir()})",
    )
    p.add_argument("--force", action="store_true", help="refit even where a valid predictor exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)


def amed_samplers(registry, text: str) -> list[tuple[object, dict]]:
    """(sampler, resolved options) for each requested AMED sampler."""
    ours = [n for n in registry.names("samplers") if n in BASES]
    specs = (
        [Spec(n) for n in ours]
        if text.strip() == "all"
        else [Spec.parse(t) for t in text.split(",") if t.strip()]
    )
    if not specs:
        raise UsageError("--samplers names nothing; name AMED samplers or use 'all'")
    chosen = []
    for spec in specs:
        sampler = registry.get("samplers", spec.name)
        if spec.name not in ours:
            raise UsageError(f"'{spec.name}' has no fit stage; AMED samplers: {', '.join(ours)}")
        chosen.append((sampler, resolve_options("sampler", spec.name, sampler.options, dict(spec.options))))
    return chosen


def cmd_fit(registry, args: argparse.Namespace) -> int:
    from bench.cli import DEFAULT_MODEL

    device = torch.device(args.device)
    spec = args.model or DEFAULT_MODEL
    denoiser = load_model(registry, spec, device)
    jobs = [(s, o, n) for s, o in amed_samplers(registry, args.samplers) for n in parse_nfe(args.nfe)]
    table = Table(title=f"AMED predictors for {spec}", title_justify="left")
    for col in ("sampler", "NFE", "predictor", "source", "fit NFE", "fit s", "file"):
        table.add_column(col, overflow="fold")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.quiet,
    ) as bar:
        for sampler, options, nfe in jobs:
            task = bar.add_task(f"{sampler.name} @ NFE {nfe}", total=None)
            try:
                plan = sampler.plan(nfe, options)
            except Infeasible as exc:
                table.add_row(sampler.name, str(nfe), "", f"infeasible: {exc}", "", "", "")
                continue
            sigmas = schedule_sigmas(registry, args.schedule, sampler, plan, denoiser, device)
            # The fit itself, its network calls counted as the runner counts prepare's
            counted = CountingDenoiser(denoiser)

            def advance(done: int, total: int, t=task) -> None:
                bar.update(t, completed=done, total=total)

            cell_options = {**options, **plan.options}
            prepared = prepare(
                sampler.name,
                BASES[sampler.name],
                counted,
                sigmas,
                cell_options,
                force=args.force,
                out=args.out,
                progress=advance,
            )
            fit_s = prepared.get("fit_s")
            table.add_row(
                sampler.name,
                str(nfe),
                prepared["predictor_kind"],
                prepared["predictor_source"],
                str(counted.nfe),
                f"{fit_s:.1f}" if fit_s is not None else "",
                prepared["predictor_file"],
            )
            bar.remove_task(task)
    out.print(table)
    return 0


def schedule_sigmas(registry, text: str, sampler, plan, denoiser, device) -> torch.Tensor:
    """The cell's sigmas, computed as the runner computes them."""
    spec = Spec.parse(sampler.default_schedule if text == "default" else text)
    schedule = registry.get("schedules", spec.name)
    options = resolve_options("schedule", schedule.name, schedule.options, dict(spec.options))
    return make_sigmas(schedule, options, plan, denoiser, device)
