"""`bench search`: search learned schedules ahead of time.

    bench search --model digits --nfe 5,10,20                       # gits, ld3, dmn for ipndm, dpm++2m, unipc
    bench search --schedules ld3:epochs=16 --samplers euler --nfe 5 --out DIR --force

It searches exactly what `bench run` would for the same model, sampler (its options and
plan) and budget (the same cache key), so a later run loads the result. Deterministic given
each schedule's seed.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from bench import (
    DEFAULT_MODEL,
    CellSpec,
    CountingDenoiser,
    Infeasible,
    Method,
    Spec,
    UsageError,
    load_model,
    parse_nfe,
    resolve,
    writable_dir,
)

from . import search
from .catalog import SCHEDULES

out = Console(highlight=False)
OURS = [s.name for s in SCHEDULES]


def specs(text: str, what: str) -> list[Spec]:
    found = [Spec.parse(t) for t in text.split(",") if t.strip()]
    if not found:
        raise UsageError(f"--{what} names nothing")
    return found


def cmd_search(registry, args: argparse.Namespace) -> int:
    """Search (or find) each schedule x sampler x budget, as a cell's build would."""
    model = args.model or DEFAULT_MODEL
    if args.out is not None:
        writable_dir(args.out, "--out")  # a file there, or no write permission: one line before any search
    denoiser = load_model(model, args.device, registry=registry)
    table = Table(title=f"learned schedules for {model}", title_justify="left")
    for col in ("schedule", "sampler", "NFE", "solver", "source", "calls", "s", "sigmas"):
        table.add_column(col, overflow="fold")
    for sched in specs(args.schedules, "schedules"):
        schedule = registry.get("schedules", sched.name)
        if schedule.name not in OURS:
            raise UsageError(f"'{sched.name}' is not searched; learned schedules: {', '.join(OURS)}")
        for sampler_spec in specs(args.samplers, "samplers"):
            for nfe in parse_nfe(args.nfe):
                # The cell's recipe, as `bench run` resolves it: options, plan, the search's key
                try:
                    recipe = resolve(registry, CellSpec(model, Method(sampler_spec, sched), nfe))
                except Infeasible as exc:
                    table.add_row(str(sched), sampler_spec.name, str(nfe), "", f"infeasible: {exc}",
                                  "", "", "")
                    continue
                counter, start = CountingDenoiser(denoiser), time.perf_counter()
                sigmas, info = search.fit(
                    schedule.name,
                    recipe.plan.steps,
                    denoiser.sigma_min,
                    denoiser.sigma_max,
                    to_zero=recipe.plan.to_zero,
                    denoiser=counter,
                    device=args.device,
                    cell=recipe.fit_cell(),
                    force=args.force,
                    out=args.out,
                    **recipe.schedule_options,
                )
                table.add_row(
                    str(sched),
                    recipe.sampler.name,
                    str(nfe),
                    info.get("search_solver", ""),
                    info["source"],
                    str(counter.nfe),
                    f"{time.perf_counter() - start:.1f}",
                    " ".join(f"{float(s):.4g}" for s in sigmas),
                )
    out.print(table)
    return 0
