"""`bench fit`: fit AMED predictors ahead of time, with a progress bar.

    bench fit --model digits --nfe 5,10,20                  # every AMED sampler, into the cache
    bench fit --samplers amed-plugin-ipndm:fit_samples=2000 --nfe 5 --out DIR --force

It fits exactly what `bench run` would fit for the same model, schedule, budget and
sampler options (the same cache key), so a later run loads the result. Deterministic
given each sampler's `fit_seed`.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench import (
    DEFAULT_MODEL,
    CellSpec,
    Infeasible,
    Method,
    Spec,
    UsageError,
    build,
    load_model,
    parse_nfe,
    writable_dir,
)

from .samplers import BASES

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def amed_samplers(registry, text: str) -> list[Spec]:
    """The requested AMED samplers, each a Spec with its options."""
    ours = [n for n in registry.names("samplers") if n in BASES]
    specs = [Spec(n) for n in ours] if text.strip() == "all" else [
        Spec.parse(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise UsageError("--samplers names nothing; name AMED samplers or use 'all'")
    for spec in specs:
        registry.get("samplers", spec.name)
        if spec.name not in ours:
            raise UsageError(f"'{spec.name}' has no fit stage; AMED samplers: {', '.join(ours)}")
    return specs


def cmd_fit(registry, args: argparse.Namespace) -> int:
    """Fit (or find) the predictor of each AMED sampler x budget, exactly as `bench run`
    would for the same cell: the cell is built by bench.build, whose prepare stage fits."""
    model = args.model or DEFAULT_MODEL
    schedule = None if args.schedule == "default" else Spec.parse(args.schedule)
    jobs = [(s, n) for s in amed_samplers(registry, args.samplers) for n in parse_nfe(args.nfe)]
    if args.out is not None:
        writable_dir(args.out)  # a file there, or no write permission: one line before any fit
    denoiser = load_model(model, args.device, registry=registry)
    table = Table(title=f"AMED predictors for {model}", title_justify="left")
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
        for sampler, nfe in jobs:
            task = bar.add_task(f"{sampler.name} @ NFE {nfe}", total=None)

            def advance(done: int, total: int, t=task) -> None:
                bar.update(t, completed=done, total=total)

            spec = CellSpec(model, Method(sampler, schedule), nfe)
            try:
                solve = build(registry, spec, denoiser, args.device,
                              prepare_kwargs={"force": args.force, "out": args.out, "progress": advance})
            except Infeasible as exc:
                table.add_row(sampler.name, str(nfe), "", f"infeasible: {exc}", "", "", "")
                continue
            chosen, fit_s = solve.prep["prepared"], solve.prepared.get("fit_s")
            table.add_row(
                sampler.name,
                str(nfe),
                chosen["predictor_kind"],
                chosen["predictor_source"],
                str(solve.prep["prepare_nfe"]),
                f"{fit_s:.1f}" if fit_s is not None else "",
                chosen["predictor_file"],
            )
            bar.remove_task(task)
    out.print(table)
    return 0
