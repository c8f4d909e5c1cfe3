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
    """Real data's value of metric `key` at the records' sample count (the largest, in a race,
    where counts differ), if the run has it."""
    known = [r for r in records if (r.get("floor") or {}).get(key)]
    return max(known, key=lambda r: r.get("num_samples") or 0)["floor"][key] if known else None


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
    (EDM reports the minimum over its blocks), `repeats` the number of blocks; a raced
    method's record is its last round's (the most samples it got)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["method"], r["nfe"]), []).append(r)
    out = []
    for rs in cells.values():
        if any(isinstance(r.get("race"), dict) for r in rs):  # a raced method: its last round
            out += finals(rs)
            continue
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
    share their sample count and seeds (one sweep); cells without replicates are left out.
    A raced budget (`--race`) is judged at its largest n: the race's own outcome for its
    metric, the paired verdict of the finalists for the others; the methods that left earlier
    are listed with the round and n they left at, never compared at another n."""
    from .stats import verdict

    out = []
    for model, records in by_model(run).items():
        ok = [r for r in records if r.get("status") == "ok" and r.get("replicates")]
        reps: dict[str, Any] = {r["cell_id"]: run.replicates(r) for r in ok}
        reps = {k: v for k, v in reps.items() if v is not None}
        for metric in dict.fromkeys(m for r in ok for m in r.get("metrics", {})):
            for nfe in sorted({r["nfe"] for r in ok}):
                cells = [r for r in ok if r["nfe"] == nfe and metric in reps.get(r["cell_id"], {})]
                race = race_of(cells)
                if race:  # the finalists, at the race's largest n
                    cells = [r for r in finals(cells) if r["num_samples"] == race["n"]]
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
                if race and race["metric"] == metric:  # the race's own decision at its last round
                    result = race_result(result, by_method)
                for m, entry in result["methods"].items():
                    entry["std"] = by_method[m]["metrics"][metric].get("std")
                    entry["wall_s"] = by_method[m].get("wall_s")
                    entry["at_floor"] = at_floor(by_method[m], metric)
                    entry["n"] = by_method[m].get("num_samples")
                entry = {"model": model, "metric": metric, "title": v0.get("title") or metric, "nfe": nfe,
                         "n": v0.get("n"), "floor": floor_of(cells, metric), "answers": v0.get("answers"),
                         "of": v0.get("metric"), "headline": v0.get("headline", "metric" not in v0), **result}
                out.append(with_left({**entry, "race": race},
                                     [r for r in ok if r["nfe"] == nfe], metric) if race else entry)
    return out


def race_of(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A raced budget's summary from its records: the race metric, planned rounds, the
    largest n, and each method's last round and n, with the round it left in if it did."""
    raced = [r for r in cells if isinstance(r.get("race"), dict)]
    if not raced:
        return None
    last = finals(raced)
    info = {r["method"]: {"round": r["race"].get("round"), "n": r["num_samples"],
                          "outcome": r["race"].get("outcome")} for r in last}
    return {"metric": next((r["race"].get("metric") for r in last if r["race"].get("metric")), None),
            "rounds": max(r["race"].get("rounds") or 0 for r in raced),
            "level": last[0]["race"].get("level"), "n": max(r["num_samples"] for r in last),
            "left": {m: i for m, i in info.items() if i["outcome"] == "left"}, "methods": info}


def finals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's record with the most samples (a raced method's last round)."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["method"] not in best or r.get("num_samples", 0) > best[r["method"]].get("num_samples", 0):
            best[r["method"]] = r
    return list(best.values())


def race_result(result: dict[str, Any], by_method: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The finalists' verdict with best / tied / worse as the race decided them (its outcome in
    the records of its last round; its level, split over the rounds, is the records')."""
    outcome = {m: (r.get("race") or {}).get("outcome") for m, r in by_method.items()}
    best = next((m for m, o in outcome.items() if o == "best"), result["best"])
    methods = {m: {**e, "status": "best" if m == best else ("worse" if outcome.get(m) == "left" else "tied")}
               for m, e in result["methods"].items()}
    return {**result, "best": best, "methods": methods,
            "tied": [m for m, e in methods.items() if e["status"] == "tied"],
            "worse": [m for m, e in methods.items() if e["status"] == "worse"]}


def with_left(entry: dict[str, Any], records: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """A raced budget's verdict with the methods that left before the last round added as
    worse, each at its own n with the round it left in (its value is never compared at
    another n)."""
    race, methods = entry["race"], dict(entry["methods"])
    last = {r["method"]: r for r in finals(records)}
    for m, where in race["left"].items():
        if m in methods or m not in last or metric not in last[m].get("metrics", {}):
            continue
        v = last[m]["metrics"][metric]
        methods[m] = {"point": v["value"], "std": v.get("std"), "n": where["n"], "status": "worse",
                      "left_round": where["round"], "wall_s": last[m].get("wall_s"),
                      "at_floor": at_floor(last[m], metric)}
    return {**entry, "methods": methods, "worse": [*entry["worse"], *(m for m in methods
                                                                      if m not in entry["methods"])]}


def verdict_marks(run, entries: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(cell id, metric) -> "★ " for each budget's best, "≈ " for the methods tied with it (a
    raced method's mark on its record at the n it was judged at)."""
    marks = {}
    for e in entries:
        for r in run.records:
            if r.get("model") == e["model"] and r.get("nfe") == e["nfe"] and r.get("status") == "ok":
                judged = e["methods"].get(r["method"], {})
                if judged.get("n") not in (None, r.get("num_samples")):
                    continue
                if judged.get("status") in ("best", "tied"):
                    marks[(r["cell_id"], e["metric"])] = "★ " if judged["status"] == "best" else "≈ "
    return marks
