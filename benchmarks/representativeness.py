"""Does a model rank samplers as real image models do? Spearman's rank correlation of a
model's solver ranking with the published ones.

    OMP_NUM_THREADS=1 python benchmarks/representativeness.py --model mnist --num-samples 2000

The published tables: zju-pi/diff-sampler, diff-solvers-main/README.md, "Results": FID of
50k samples from EDM's CIFAR-10 (unconditional), FFHQ-64 (unconditional) and ImageNet-64
(conditional) models for 7 solvers at NFE 3..10, under one protocol: no AFS, no denoise to
zero (the schedule stops at sigma_min); Euler, Heun, DPM-Solver-2 and iPNDM on the
polynomial schedule with rho = 7; DPM-Solver++(3M) and UniPC-3 on log-SNR steps with data
prediction and lower_order_final, UniPC's variant bh2; DEIS-tAB3 on the time-uniform
schedule with rho = 2. "-" is a budget the solver cannot spend (Heun and DPM-Solver-2 take
2 calls a step and have no AFS here: even NFE only).

The same protocol here, each solver as this project's sampler, options and schedule
(bench-classic; `bench list samplers` shows each NFE rule):

    published          sampler                                                       schedule
    Euler              euler:afs=false:denoise_to_zero=false                         karras (rho 7)
    Heun               heun:afs=false:denoise_to_zero=false      (NFE = 2 steps)     karras (rho 7)
    DPM-Solver-2       dpm-solver-2:afs=false:denoise_to_zero=false (NFE = 2 steps)  karras (rho 7)
    DPM-Solver++(3M)   dpm++3m:afs=false:denoise_to_zero=false:lower_order_final=true  logsnr
    UniPC-3            unipc:order=3:variant=bh2:afs=false:denoise_to_zero=false:
                         lower_order_final=true                                      logsnr
    DEIS-tAB3          deis:order=4:mode=tab:afs=false:denoise_to_zero=false         time-uniform:rho=2
    iPNDM-4            ipndm:order=4:afs=false:denoise_to_zero=false                 karras (rho 7)

(`karras` is diff-sampler's `polynomial`; `time-uniform` fits the VP SDE to the model's sigma
range with eps_s = 1e-3 as diff-sampler's `time_uniform`; DEIS order 4 is tAB3, three past
points; odd budgets of Heun and DPM-Solver-2 are infeasible cells, the tables' "-".) The
schedules are named, not left to the model, so a flow model runs the same steps.

Each solver is one `bench.run` on the same seed block, so every cell starts from the same
noise and the cells' bootstrap replicates are paired (bench.stats.index_sets). Each cell is
scored by the model's FID metric (its own, e.g. fid-mnist, with its bootstrap standard
error) and by `reference` RMSE (to the model's own ODE solved from the same noise). The
script prints the FID and RMSE tables, then, per NFE and on average over NFE 3..10,
Spearman's rank correlation of the model's ranking with each published table (by FID and
by reference RMSE), over the solvers feasible at that NFE (7 at even NFE, 5 at odd). How
firm each ranking is: per NFE, the pairs of solvers adjacent in the measured order whose
paired 95% bootstrap interval of the difference excludes 0, and the spread of the mean
correlation over the paired bootstrap replicates (the ranking recomputed on each).
`--out DIR` keeps the runs (DIR/<model>/<solver>/) and writes DIR/<model>/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

NFES = tuple(range(3, 11))

# diff-sampler's protocol: published name -> (sampler spec, schedule spec)
SOLVERS = {
    "Euler": ("euler:afs=false:denoise_to_zero=false", "karras:rho=7"),
    "Heun": ("heun:afs=false:denoise_to_zero=false", "karras:rho=7"),
    "DPM-Solver-2": ("dpm-solver-2:afs=false:denoise_to_zero=false", "karras:rho=7"),
    "DPM-Solver++(3M)": ("dpm++3m:afs=false:denoise_to_zero=false:lower_order_final=true", "logsnr"),
    "UniPC-3": ("unipc:order=3:variant=bh2:afs=false:denoise_to_zero=false:lower_order_final=true", "logsnr"),
    "DEIS-tAB3": ("deis:order=4:mode=tab:afs=false:denoise_to_zero=false", "time-uniform:rho=2"),
    "iPNDM-4": ("ipndm:order=4:afs=false:denoise_to_zero=false", "karras:rho=7"),
}

_ = None  # "-": a budget the solver cannot spend
# FID (50k samples) at NFE 3..10, diff-solvers-main/README.md
PUBLISHED = {
    "CIFAR-10": {
        "Euler": [93.36, 66.76, 49.66, 35.62, 27.93, 22.32, 18.43, 15.69],
        "Heun": [_, 319.87, _, 99.74, _, 38.06, _, 15.93],
        "DPM-Solver-2": [_, 145.98, _, 60.00, _, 10.30, _, 5.01],
        "DPM-Solver++(3M)": [110.03, 46.52, 24.97, 11.99, 6.74, 4.54, 3.42, 3.00],
        "UniPC-3": [109.61, 45.20, 23.98, 11.14, 5.83, 3.99, 3.21, 2.89],
        "DEIS-tAB3": [56.01, 25.66, 14.39, 9.40, 6.94, 5.55, 4.68, 4.09],
        "iPNDM-4": [47.98, 24.82, 13.59, 7.05, 5.08, 3.69, 3.17, 2.77],
    },
    "FFHQ-64": {
        "Euler": [78.21, 57.48, 43.93, 35.22, 28.86, 24.39, 21.01, 18.37],
        "Heun": [_, 344.87, _, 142.39, _, 57.21, _, 29.54],
        "DPM-Solver-2": [_, 238.57, _, 83.17, _, 22.84, _, 9.46],
        "DPM-Solver++(3M)": [86.45, 45.95, 22.51, 13.74, 8.44, 6.04, 4.77, 4.12],
        "UniPC-3": [86.43, 44.78, 21.40, 12.85, 7.44, 5.50, 4.47, 3.84],
        "DEIS-tAB3": [54.52, 28.31, 17.36, 12.25, 9.37, 7.59, 6.39, 5.56],
        "iPNDM-4": [45.98, 28.29, 17.17, 10.03, 7.79, 5.52, 4.58, 3.98],
    },
    "ImageNet-64": {
        "Euler": [82.96, 58.43, 43.81, 34.03, 27.46, 22.59, 19.27, 16.72],
        "Heun": [_, 249.41, _, 89.63, _, 37.65, _, 16.46],
        "DPM-Solver-2": [_, 129.75, _, 44.83, _, 12.42, _, 6.84],
        "DPM-Solver++(3M)": [91.52, 56.34, 25.49, 15.06, 10.14, 7.84, 6.48, 5.67],
        "UniPC-3": [91.38, 55.63, 24.36, 14.30, 9.57, 7.52, 6.34, 5.53],
        "DEIS-tAB3": [44.51, 23.53, 14.75, 12.57, 8.20, 6.84, 5.97, 5.34],
        "iPNDM-4": [58.53, 33.79, 18.99, 12.92, 9.17, 7.20, 5.91, 5.11],
    },
}

Table = dict[str, dict[int, float]]  # solver -> NFE -> value (lower is better)


def published(name: str) -> Table:
    """A published table as solver -> NFE -> FID, infeasible budgets left out."""
    return {s: {n: v for n, v in zip(NFES, row, strict=True) if v is not None}
            for s, row in PUBLISHED[name].items()}


# --- Rank correlation -----------------------------------------------------------------


def spearman(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Spearman's rank correlation (scipy's, ties at their average rank) over the keys both
    hold with finite values; None with fewer than 3 such keys or a constant side."""
    from scipy.stats import spearmanr

    keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(keys) < 3 or len({a[k] for k in keys}) < 2 or len({b[k] for k in keys}) < 2:
        return None
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def correlations(measured: Table, reference: Table, nfes=NFES) -> dict[str, Any]:
    """Per NFE, Spearman's rho between the two tables' columns (solvers present in both), and
    the mean over the NFE where it is defined."""
    per_nfe = {n: spearman({s: v[n] for s, v in measured.items() if n in v},
                           {s: v[n] for s, v in reference.items() if n in v}) for n in nfes}
    defined = [r for r in per_nfe.values() if r is not None]
    return {"per_nfe": per_nfe, "mean": float(np.mean(defined)) if defined else None}


# --- Measuring ------------------------------------------------------------------------


def metric_of(model: str) -> str:
    """The model's FID metric: the first of its source's default metrics named fid-*."""
    import bench

    source = bench.registry().get("models", model.partition(":")[0])
    names = [m for m in source.default_metrics if m.startswith("fid")]
    if not names:
        raise bench.UsageError(f"model '{model}' has no FID metric of its own; give --metric")
    return names[0]


def measure(model: str, num_samples: int, out: Path, metric: str, seed: int = 0,
            batch_size: int = 256) -> list[dict[str, Any]]:
    """Run every solver of the protocol at NFE 3..10 on `model` (one bench.run each, the same
    seed block); the cells as dicts: solver, nfe, status, values, s.e. and replicates."""
    import bench

    cells = []
    for solver, (sampler, schedule) in SOLVERS.items():
        frame = bench.run(model=model, samplers=sampler, schedule=schedule, nfe=list(NFES),
                          num_samples=num_samples, seed=seed, batch_size=batch_size,
                          metrics=f"{metric},reference", report="", out=out / slug(solver))
        run = bench.Run.open(frame.attrs["run_dir"])
        for r in run.records:
            cell = {"solver": solver, "nfe": r["nfe"], "status": r["status"], "reason": r.get("reason"),
                    "wall_s": r.get("wall_s"), "floor": r.get("floor"),
                    "values": {k: (v.get("value"), v.get("std")) for k, v in r.get("metrics", {}).items()}}
            path = run.file(r.get("replicates"))
            if path is not None:
                with np.load(path) as data:
                    cell["replicates"] = {k: data[k] for k in data.files}
            cells.append(cell)
    return cells


def slug(name: str) -> str:
    """A directory name: runs of other characters than letters and digits become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_of(cells: list[dict[str, Any]], key: str, replicate: int | None = None) -> Table:
    """solver -> NFE -> the metric `key` of each ok cell (or its bootstrap replicate)."""
    out: Table = {}
    for c in cells:
        if c["status"] != "ok" or key not in c["values"]:
            continue
        value = c["values"][key][0] if replicate is None else c["replicates"][key][replicate]
        out.setdefault(c["solver"], {})[c["nfe"]] = float(value)
    return out


def resolved_pairs(cells: list[dict[str, Any]], key: str, nfe: int) -> tuple[int, int]:
    """Of the solvers adjacent in the measured order at `nfe`, how many pairs have a paired 95%
    bootstrap interval of their difference that excludes 0, and how many pairs there are."""
    from bench.stats import paired_interval

    ok = sorted((c for c in cells if c["status"] == "ok" and c["nfe"] == nfe and key in c["values"]),
                key=lambda c: c["values"][key][0])
    firm = 0
    for a, b in zip(ok, ok[1:], strict=False):
        low, high = paired_interval(b["replicates"][key], a["replicates"][key])
        firm += low > 0 or high < 0
    return firm, max(len(ok) - 1, 0)


def replicate_spread(cells: list[dict[str, Any]], key: str, reference: Table) -> float | None:
    """Standard deviation, over the paired bootstrap replicates, of the mean correlation."""
    counts = {len(c["replicates"][key]) for c in cells
              if c["status"] == "ok" and key in c.get("replicates", {})}
    if len(counts) != 1:
        return None
    means = [correlations(table_of(cells, key, b), reference)["mean"] for b in range(counts.pop())]
    means = [m for m in means if m is not None and math.isfinite(m)]
    return float(np.std(means, ddof=1)) if len(means) > 1 else None


def summarise(cells: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, Any]:
    """Per metric key: the measured table, the correlations with each published table, how
    firm the per-NFE ranking is, and the spread of each mean over the bootstrap replicates."""
    out = {}
    for label, key in keys.items():
        measured = table_of(cells, key)
        out[label] = {
            "key": key,
            "table": {s: {str(n): v for n, v in row.items()} for s, row in measured.items()},
            "resolved_pairs": {str(n): resolved_pairs(cells, key, n) for n in NFES},
            "published": {},
        }
        for name in PUBLISHED:
            corr = correlations(measured, published(name))
            out[label]["published"][name] = {
                "per_nfe": {str(n): r for n, r in corr["per_nfe"].items()},
                "mean": corr["mean"],
                "mean_spread": replicate_spread(cells, key, published(name)),
            }
        means = [v["mean"] for v in out[label]["published"].values() if v["mean"] is not None]
        out[label]["mean_over_tables"] = float(np.mean(means)) if means else None
    return out


# --- Printing -------------------------------------------------------------------------


def fmt(value: float | None, std: float | None = None) -> str:
    """A value to its standard error's leading digit (3 significant digits without one)."""
    if value is None or not math.isfinite(value):
        return "-"
    if std is None or not std > 0:
        return f"{value:.3g}"
    digits = max(0, 1 - math.floor(math.log10(std)))
    return f"{value:.{digits}f} ± {std:.{digits}f}" if digits <= 6 else f"{value:.3g} ± {std:.1g}"


def value_table(cells: list[dict[str, Any]], key: str) -> str:
    """Markdown: solver x NFE, value ± s.e. ('-' for an infeasible budget)."""
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---" * (len(NFES) + 1) + "|"]
    for solver in SOLVERS:
        row = []
        for n in NFES:
            c = next((c for c in cells if c["solver"] == solver and c["nfe"] == n), None)
            ok = c is not None and c["status"] == "ok" and key in c["values"]
            row.append(fmt(*c["values"][key]) if ok else "-")
        lines.append(f"| {solver} | " + " | ".join(row) + " |")
    floor = next((c["floor"][key] for c in cells if key in (c.get("floor") or {})), None)
    if floor:  # real data scored at the same n: the best value any cell can reach
        lines.append(f"| real data (floor) | {fmt(floor.get('value'), floor.get('std'))} |")
    return "\n".join(lines)


def correlation_table(summary: dict[str, Any]) -> str:
    """Markdown: per published table and metric, Spearman's rho per NFE and the mean."""
    lines = ["| by | published table | " + " | ".join(str(n) for n in NFES) + " | mean |",
             "|---|---" + "|---" * (len(NFES) + 1) + "|"]
    for label, entry in summary.items():
        for name, corr in entry["published"].items():
            cells = [fmt(corr["per_nfe"][str(n)]) if corr["per_nfe"][str(n)] is None
                     else f"{corr['per_nfe'][str(n)]:.2f}" for n in NFES]
            mean = "-" if corr["mean"] is None else f"{corr['mean']:.2f}"
            if corr.get("mean_spread") is not None:
                mean += f" ± {corr['mean_spread']:.2f}"
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {mean} |")
        pairs = " | ".join(f"{a}/{b}" for a, b in entry["resolved_pairs"].values())
        lines.append(f"| {label} | adjacent pairs resolved | {pairs} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist", help="model spec (default mnist)")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per cell (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed block (default 0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--metric", default=None, help="the FID metric (default: the model's own fid-*)")
    parser.add_argument("--out", type=Path, default=Path("reports/representativeness"),
                        help="where the runs and summary.json go (DIR/<model>/)")
    args = parser.parse_args(argv)
    from bench.errors import BenchError

    try:
        metric = args.metric or metric_of(args.model)
        out = args.out / slug(args.model)
        cells = measure(args.model, args.num_samples, out, metric, args.seed, args.batch_size)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = {f"FID ({metric})": metric.replace("-", "_"), "reference RMSE": "reference_rmse"}
    keys = {label: key if any(key in c["values"] for c in cells) else metric
            for label, key in keys.items()}
    summary = summarise(cells, keys)
    wall = sum(c["wall_s"] or 0 for c in cells)
    print(f"\nmodel {args.model}, {args.num_samples} samples per cell, seed block {args.seed}, "
          f"sampling {wall:.0f} s")
    for label, key in keys.items():
        print(f"\n{label}:\n\n{value_table(cells, key)}")
    print("\nSpearman's rank correlation with the published tables (NFE 3..10):\n")
    print(correlation_table(summary))
    print("\nmean over NFE 3..10 and the three tables: "
          + ", ".join(f"by {label} {entry['mean_over_tables']:.2f}" for label, entry in summary.items()
                      if entry["mean_over_tables"] is not None))
    (out / "summary.json").write_text(json.dumps(
        {"model": args.model, "num_samples": args.num_samples, "seed": args.seed, "metric": metric,
         "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
