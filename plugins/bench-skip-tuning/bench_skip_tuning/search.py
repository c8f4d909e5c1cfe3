"""`bench skip-tune`: find skip factors for a model, sampler and budget, and store them.

    bench skip-tune --model digits --samplers euler,dpm++2m --nfe 5,10

For each (sampler, budget) it evaluates a grid of (rho_bottom, rho_top) with the
runner itself (`bench run` with `--modifiers skip-tuning:rho_bottom=..:rho_top=..`, so
the search measures exactly what a run measures), on a few hundred samples, with a cheap
metric (the model's first default metric unless `--metric`), then runs a compass search
from the best grid point (it may leave the grid) down to a step 1/2^refine of the grid's.
Samples are drawn from `--seed` (default 100000), far from the
seeds evaluation runs use, so the chosen factors are judged on samples they were not
chosen on. The best factors are stored with the model (and a fingerprint of its
weights), sampler, schedule and budget, and the metric with and without them.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from itertools import product
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import bench
from bench import Method, Run, Spec, UsageError, load_model, parse_nfe

from . import __version__, tuned
from .modifier import layout_of

MAX_MOVES = 12  # compass-search moves per (sampler, budget)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def parse_values(text: str, what: str) -> list[float]:
    """`0.8,0.9,1` -> [0.8, 0.9, 1.0]."""
    try:
        values = sorted({round(float(v), 6) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"{what}: '{text}' is not a comma list of numbers, e.g. 0.8,0.9,1.0") from None
    if not values or min(values) <= 0:
        raise UsageError(f"{what}: give positive factors, e.g. 0.8,0.9,1.0")
    return values


def method(sampler: Spec, schedule: Spec | None, rho: tuple[float, float] | None) -> Method:
    """The sampler alone (rho None) or with skip-tuning at rho = (rho_bottom, rho_top)."""
    if rho is None:
        return Method(sampler, schedule)
    options = (("rho_bottom", f"{rho[0]:g}"), ("rho_top", f"{rho[1]:g}"))
    return Method(sampler, schedule, (Spec("skip-tuning", options),))


def evaluate(
    registry,
    args,
    sampler: Spec,
    schedule: Spec | None,
    nfe: int,
    metric: str,
    points: list[tuple[float, float] | None],
    work: Path,
) -> dict[Any, tuple[float, bool]]:
    """{rho (or None): (metric value, higher is better)} through the runner, same noise for all."""
    default = registry.get("samplers", sampler.name).default_schedule
    labels = {p: method(sampler, schedule, p).label(default) for p in points}
    variants = ["+".join(map(str, method(sampler, schedule, p).modifiers)) or "none" for p in points]
    bench.run(model=args.model, samplers=str(sampler), schedule=str(schedule or "default"),
              modifiers=variants, nfe=[nfe], seeds=f"{args.seed}-{args.seed + args.num_samples - 1}",
              batch_size=args.batch_size, device=args.device, metrics=metric, out=work, report="")
    records = {r["method"]: r for r in Run.open(work).records if r["nfe"] == nfe}
    return {p: metric_value(records[label], metric) for p, label in labels.items()}


def metric_value(record: dict[str, Any], metric: str) -> tuple[float, bool]:
    """(value, higher is better) of the metric's value in a cell (its only one, or the one
    named like the metric, e.g. fid_digits for fid-digits)."""
    if record.get("status") != "ok":
        raise UsageError(
            f"skip-tune: {record['method']} @ NFE {record['nfe']} is {record['status']}: "
            f"{record.get('reason')}"
        )
    values = record["metrics"]
    key = next(iter(values)) if len(values) == 1 else metric.replace("-", "_")
    if key not in values:
        raise UsageError(
            f"skip-tune: metric '{metric}' reports {', '.join(values)}; pick a single-valued metric"
        )
    return float(values[key]["value"]), bool(values[key].get("higher_is_better"))


def neighbours(best: tuple[float, float], steps: tuple[float, float]) -> list[tuple[float, float]]:
    """The 3x3 grid around `best` at the given steps, positive factors only."""
    out_ = []
    for db, dt in product((-1, 0, 1), repeat=2):
        point = (round(best[0] + db * steps[0], 6), round(best[1] + dt * steps[1], 6))
        if min(point) > 0:
            out_.append(point)
    return out_


def grid_step(values: list[float]) -> float:
    """The smallest gap of a coarse grid (0.1 for a single value)."""
    gaps = [b - a for a, b in zip(values, values[1:], strict=False)]
    return min(gaps) if gaps else 0.1


def search(
    registry, args, sampler: Spec, schedule: Spec | None, nfe: int, metric: str, work: Path
) -> tuple[tuple[float, float], dict[Any, tuple[float, bool]]]:
    """(best rho, every score): a coarse grid, then a compass search from its best point:
    the 3x3 neighbours at the current step; move while a neighbour is better (so the search
    can leave the grid), else halve the step, `args.refine` times."""
    bottoms, tops = parse_values(args.rho_bottom, "--rho-bottom"), parse_values(args.rho_top, "--rho-top")
    scores = evaluate(registry, args, sampler, schedule, nfe, metric, [None, *product(bottoms, tops)], work)
    sign = -1 if scores[None][1] else 1  # minimise sign * value

    def best_so_far() -> tuple[float, float]:
        return min((p for p in scores if p is not None), key=lambda p: sign * scores[p][0])

    # Compass search: at most MAX_MOVES moves in all
    steps, halvings, moves = (grid_step(bottoms), grid_step(tops)), 0, 0
    while halvings < args.refine and moves < MAX_MOVES:
        centre = best_so_far()
        fresh = [p for p in neighbours(centre, steps) if p not in scores]
        if fresh:
            scores.update(evaluate(registry, args, sampler, schedule, nfe, metric, fresh, work))
        if best_so_far() == centre:
            steps, halvings = (steps[0] / 2, steps[1] / 2), halvings + 1
        else:
            moves += 1
    return best_so_far(), scores


def command_line(args: argparse.Namespace) -> str:
    """The `bench skip-tune` command that reproduces this search."""
    options = (
        "model",
        "samplers",
        "nfe",
        "schedule",
        "metric",
        "num_samples",
        "batch_size",
        "seed",
        "rho_bottom",
        "rho_top",
        "refine",
    )
    argv = ["skip-tune"]
    for key in options:
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return "bench " + shlex.join(argv)


def cmd_skip_tune(registry, args: argparse.Namespace) -> int:
    device = args.device
    if args.num_samples < 2:
        raise UsageError("--num-samples must be at least 2")
    if args.refine < 0:
        raise UsageError(f"--refine: {args.refine}; give a number of step halvings >= 0 (default 3)")
    # Where the factors go, writable before any search
    bench.writable_file(args.out or tuned.cache_dir() / tuned.file_name(args.model), "--out")
    denoiser = load_model(args.model, device, registry=registry)
    layout = layout_of(denoiser)  # one-line error for a model without reachable skips
    fp = tuned.fingerprint(denoiser.net)
    source = registry.get("models", args.model.partition(":")[0])
    metric = args.metric or (source.default_metrics[0] if source.default_metrics else None)
    if metric is None:
        raise UsageError(f"model '{args.model}' names no default metric; pass --metric")
    registry.get("metrics", metric)
    schedule = None if args.schedule == "default" else Spec.parse(args.schedule)
    samplers = [Spec.parse(s) for s in args.samplers.split(",") if s.strip()]
    if not samplers:
        raise UsageError("--samplers names nothing; give e.g. euler,dpm++2m")
    path = args.out or tuned.cache_dir() / tuned.file_name(args.model)
    table = Table(
        title=f"skip-tuning factors for {args.model} ({layout.count} skips of the {layout.kind})",
        title_justify="left",
    )
    for col in (
        "sampler",
        "NFE",
        "rho_bottom",
        "rho_top",
        f"{metric} tuned",
        f"{metric} untuned",
        "candidates",
        "s",
    ):
        table.add_column(col)
    for sampler, nfe in product(samplers, parse_nfe(args.nfe)):
        sampler_obj = registry.get("samplers", sampler.name)
        sched = schedule or Spec.parse(sampler_obj.default_schedule)
        start = time.perf_counter()
        err.print(f"searching {sampler} @ NFE {nfe} ...")
        with tempfile.TemporaryDirectory(prefix="skip-tune-") as work:
            best, scores = search(registry, args, sampler, schedule, nfe, metric, Path(work))
        rho_bottom, rho_top = best
        entry = {
            "model": args.model,
            "fingerprint": fp,
            "sampler": str(sampler),
            "schedule": str(sched),
            "nfe": nfe,
            "rho_bottom": rho_bottom,
            "rho_top": rho_top,
            "skips": layout.count,
            "metric": metric,
            "value": scores[best][0],
            "untuned_value": scores[None][0],
            "num_samples": args.num_samples,
            "seed": args.seed,
            "candidates": len(scores) - 1,
            "scores": sorted([*rho, round(v, 6)] for rho, (v, _) in scores.items() if rho is not None),
            "command": command_line(args),
            "plugin": f"bench-skip-tuning=={__version__}",
            "torch": torch.__version__,
        }
        tuned.save(path, entry)
        table.add_row(
            str(sampler),
            str(nfe),
            f"{rho_bottom:g}",
            f"{rho_top:g}",
            f"{entry['value']:.4g}",
            f"{entry['untuned_value']:.4g}",
            str(entry["candidates"]),
            f"{time.perf_counter() - start:.0f}",
        )
    out.print(table)
    out.print(f"factors written to {path}")
    return 0
