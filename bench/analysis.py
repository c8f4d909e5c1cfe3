"""What a run concludes, computed once and handed to every reporter: the records grouped by
model, the disjoint seed blocks of `--repeats` pooled, and per model, metric and budget the
verdict (the best method, those tied with it, those worse, on paired bootstrap intervals)
with the marks tables show. `run.analysis` (bench.Run) holds it; a third-party reporter
reads the same object the built-in ones do:

    def render(run, console):
        for v in run.analysis.verdicts:
            console.print(v["model"], v["metric"], v["nfe"], v["best"], sorted(v["tied"]))
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95


@dataclass
class Analysis:
    """A run's analysis (`analyse`): `groups` and `pooled` are the records by model (pooled:
    one per method and budget, seed blocks folded), `verdicts` one entry per model, metric
    and budget, `marks` (cell id, metric) -> "★ " (best) or "≈ " (tied with it)."""

    level: float
    groups: dict[str, list[dict[str, Any]]]
    pooled: dict[str, list[dict[str, Any]]]
    verdicts: list[dict[str, Any]]
    marks: dict[tuple[str, str], str]


def analyse(run, level: float = LEVEL) -> Analysis:
    """The analysis of a run (bench.Run), its replicates read once."""
    entries = verdicts(run, level)
    return Analysis(level, by_model(run), by_model(run, pooled=True), entries, verdict_marks(run, entries))


def at_floor(record: dict[str, Any], key: str) -> bool:
    """Whether the cell's value is within two standard errors of real data's at that n."""
    v, f = record.get("metrics", {}).get(key), (record.get("floor") or {}).get(key)
    if not v or not f or v.get("std") is None:
        return False
    gap = (f["value"] - v["value"]) if v.get("higher_is_better") else (v["value"] - f["value"])
    return gap <= 2 * v["std"]


def floor_of(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Real data's value of metric `key` at the records' sample count, if the run has it."""
    return next(((r.get("floor") or {}).get(key) for r in records if (r.get("floor") or {}).get(key)), None)


def by_model(run, pooled: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The run's records grouped by model, in run order; `pooled` folds the disjoint seed
    blocks of `--repeats` into one record per method and budget (`pool`)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in run.records:
        groups.setdefault(r["model"], []).append(r)
    return {m: pool(rs) for m, rs in groups.items()} if pooled else groups


def pool(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, NFE): with several seed blocks (repeats), each metric is the
    mean over blocks with `std` the standard deviation between blocks, `min` the best block
    (EDM reports the minimum over its blocks), `repeats` the number of blocks."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["method"], r["nfe"]), []).append(r)
    out = []
    for rs in cells.values():
        ok = [r for r in rs if r.get("status") == "ok"]
        if len(rs) == 1 or len(ok) != len(rs):
            out.append(rs[0] if len(ok) == len(rs) else next(r for r in rs if r.get("status") != "ok"))
            continue
        merged = {**ok[0], "metrics": {}, "wall_s": statistics.fmean(r.get("wall_s") or 0 for r in ok)}
        for key, v0 in ok[0].get("metrics", {}).items():
            values = [r["metrics"][key]["value"] for r in ok if key in r.get("metrics", {})]
            best = max(values) if v0.get("higher_is_better") else min(values)
            merged["metrics"][key] = {**v0, "value": statistics.fmean(values), "min": best,
                                      "std": statistics.stdev(values), "repeats": len(values)}
        out.append(merged)
    return out


def verdicts(run, level: float = LEVEL) -> list[dict[str, Any]]:
    """Per model, metric and NFE budget: the best method, the methods not significantly worse
    at `level` (paired bootstrap intervals of the difference, Holm-corrected; bench.stats),
    the worse ones, each with its value, interval and wall-clock. Cells are paired when they
    share their sample count and seeds (one sweep); cells without replicates are left out."""
    from .stats import verdict

    out = []
    for model, records in by_model(run).items():
        ok = [r for r in records if r.get("status") == "ok" and r.get("replicates")]
        reps: dict[str, Any] = {r["cell_id"]: run.replicates(r) for r in ok}
        reps = {k: v for k, v in reps.items() if v is not None}
        for metric in dict.fromkeys(m for r in ok for m in r.get("metrics", {})):
            for nfe in sorted({r["nfe"] for r in ok}):
                cells = [r for r in ok if r["nfe"] == nfe and metric in reps.get(r["cell_id"], {})]
                if cells:  # paired within one seed block: the first (with --repeats, block 0)
                    first = min(r.get("seed") or 0 for r in cells)
                    cells = [r for r in cells if (r.get("seed") or 0) == first]
                if len({r.get("num_samples") for r in cells}) > 1 or not cells:
                    continue
                by_method = {r["method"]: r for r in cells}
                v0 = cells[0]["metrics"][metric]
                result = verdict({m: r["metrics"][metric]["value"] for m, r in by_method.items()},
                                 {m: reps[r["cell_id"]][metric] for m, r in by_method.items()},
                                 bool(v0.get("higher_is_better")), level)
                for m, entry in result["methods"].items():
                    entry["std"] = by_method[m]["metrics"][metric].get("std")
                    entry["wall_s"] = by_method[m].get("wall_s")
                    entry["at_floor"] = at_floor(by_method[m], metric)
                out.append({"model": model, "metric": metric, "title": v0.get("title") or metric,
                            "nfe": nfe, "n": v0.get("n"), "floor": floor_of(cells, metric), **result})
    return out


def verdict_marks(run, entries: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(cell id, metric) -> "★ " for each budget's best, "≈ " for the methods tied with it."""
    marks = {}
    for e in entries:
        for r in run.records:
            if r.get("model") == e["model"] and r.get("nfe") == e["nfe"] and r.get("status") == "ok":
                status = e["methods"].get(r["method"], {}).get("status")
                if status in ("best", "tied"):
                    marks[(r["cell_id"], e["metric"])] = "★ " if status == "best" else "≈ "
    return marks
