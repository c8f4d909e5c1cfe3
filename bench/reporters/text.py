"""Reporters: views of a finished run, rendered from its results.jsonl alone.

Every table has one row per method and one column per NFE budget; a cell shows the value
(± its standard error where the metric reports one), or `infeasible` / `failed`.
"""

from __future__ import annotations

import math
import re
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..analysis import LEVEL, at_floor, by_model, floor_of, pool, verdicts  # noqa: F401 -- reports' names in 0.2
from ..errors import printable
from ..files import atomic_write
from ..rundir import Run


def fmt(value: float | None, std: float | None = None) -> str:
    """4 significant digits; with a standard error, the value to the decimal place of the
    error's leading digit (two digits when that is 1): `1.24 ± 0.13`, `-0.00 ± 0.02`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if std is None or not math.isfinite(std) or std <= 0:
        return f"{value:.4g}"
    exponent = math.floor(math.log10(std))
    digits = 2 if f"{std:e}"[0] == "1" else 1
    decimals = max(0, digits - 1 - exponent)
    return f"{value:.{decimals}f} ± {std:.{decimals}f}"


def cell_text(record: dict[str, Any], key: str) -> str:
    """What a table cell shows for `key` (a metric name, or a record field such as wall_s)."""
    status = record.get("status")
    if status != "ok":
        return status or ""
    if key in record.get("metrics", {}):
        v = record["metrics"][key]
        text = fmt(v.get("value"), v.get("std"))
        if v.get("repeats"):  # mean ± sd over disjoint seed blocks, and the best block
            text += f" (best {fmt(v['min'])}, {v['repeats']} blocks)"
        if isinstance(record.get("race"), dict):  # a raced cell: the n it reached
            text += f" n={record.get('num_samples')}"
        return text + (" (floor)" if at_floor(record, key) else "")
    value = record.get(key)
    if value is None and record.get("not_applicable"):  # a metric that does not score this cell
        return "n/a (stochastic)"
    return "; ".join(map(str, value)) if isinstance(value, list) else fmt(value)


FLOOR_ROW = "real data (floor)"


# Record fields tabulated after the metrics, with their titles
TIMING_KEYS = [
    ("wall_s", "wall-clock s (sampling)"),
    ("model_s", "s inside the model"),
    ("nfe_counted", "NFE counted"),
]
# Shown when some record has the second key: a modifier's calls at another resolution
# (their own column and the total cost in full-resolution NFE) and what modifiers applied
MODIFIER_KEYS = [
    ("nfe_extra", "nfe_extra", "extra network calls at another resolution (outside the budget)"),
    ("nfe_equiv", "nfe_extra", "total cost in full-resolution NFE (counted + extra x pixel ratio)"),
    ("modifiers_applied", "modifiers_applied", "modifiers as applied"),
]


def record_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """TIMING_KEYS, then the MODIFIER_KEYS that apply to these records."""
    shown = [(k, title) for k, when, title in MODIFIER_KEYS if any(r.get(when) for r in records)]
    return TIMING_KEYS + shown


def grid_frame(records: list[dict[str, Any]], text) -> pd.DataFrame:
    """A method x NFE frame whose cells are `text(record)`."""
    budgets = sorted({r["nfe"] for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    frame = pd.DataFrame("", index=methods, columns=[f"NFE {b}" for b in budgets])
    for r in records:
        frame.loc[r["method"], f"NFE {r['nfe']}"] = text(r)
    frame.index.name = "method"
    return frame


def tables(run: Run) -> list[tuple[str, pd.DataFrame]]:
    """(title, method x NFE frame of strings) for each metric, wall-clock and counted NFE."""
    keys = [(m, _metric_title(run, m)) for m in run.metric_names()] + record_keys(run.records)
    groups, marks = run.analysis.pooled, run.analysis.marks
    out = []
    for model, records in groups.items():
        prefix = f"{model}: " if len(groups) > 1 else ""
        for key, title in keys:  # record fields (no marks, no floor) come out as plain tables
            out.append((prefix + title, metric_frame(records, key, marks)))
    return out


def _metric_title(run: Run, name: str) -> str:
    """`FID (digits) (lower is better, n=1000)`: title, direction and sample count belong to
    the metric; the title defaults to the value's key."""
    for r in run.records:
        v = r.get("metrics", {}).get(name)
        if v is not None:
            better = "higher" if v.get("higher_is_better") else "lower"
            n = f", n={v['n']}" if v.get("n") else ""
            if isinstance(r.get("race"), dict):
                n = ", raced: each cell at its own n"
            return f"{v.get('title') or name} ({better} is better{n})"
    return name


def problems(run: Run) -> list[str]:
    """One line per cell that is not ok, or whose counted NFE differs from its budget."""
    lines = []
    for r in run.records:
        if r.get("status") != "ok" or r.get("reason"):
            lines.append(f"{r['method']} @ NFE {r['nfe']}: {r.get('status')}: {r.get('reason')}")
    return lines


def verdict_frame(entries: list[dict[str, Any]], html: bool = False) -> pd.DataFrame:
    """One row per (metric, budget): best, its value and wall-clock, the tied methods and how
    many are worse (in a race, the rounds they left in); with a model column when the run has
    several models. With `html` the cells are HTML, the tied list folded after its first names."""
    rows = []
    models = len({e["model"] for e in entries}) > 1
    for e in entries:
        best = e["methods"][e["best"]]
        tied = sorted(e["tied"], key=lambda m: e["methods"][m]["point"], reverse=e["higher_is_better"])
        worse = f"{len(e['worse'])}{left_rounds(e)}"
        n = f"raced, n={e['race']['n']}" if e.get("race") else f"n={e['n']}"
        row = {
            **({"model": e["model"]} if models else {}),
            "metric": f"{e['title']} ({n})" + (f": {e['answers']}" if e.get("answers") else ""),
            "NFE": str(e["nfe"]),
            "best": e["best"],
            "value": fmt(best["point"], best.get("std")),
            "wall s": fmt(best.get("wall_s")),
            "real data": fmt(e["floor"]["value"], e["floor"].get("std")) if e.get("floor") else "",
            "tied with best": ", ".join(tied) or "none",
            "worse": worse,
        }
        if html:
            row = {k: v if k == "metric" else escape(printable(v)) for k, v in row.items()}
            if len(tied) > 3:
                shown = escape(printable(", ".join(tied[:3])))
                row["tied with best"] = (f"<details><summary>{len(tied)}: {shown}, &hellip;</summary>"
                                         f"{escape(printable(', '.join(tied)))}</details>")
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.set_index("metric") if len(frame) else frame


VERDICT_NOTE = (f"Tied: not significantly worse than the best at level {LEVEL} (paired bootstrap "
                "intervals of the difference on the same noise, Holm-corrected over the other methods). "
                "In the tables below ★ marks the best value of a budget, ≈ the values tied with it.")


def render_verdict(run: Run, console: Console) -> Path:
    """verdict.json: every verdict with each method's value, interval and wall-clock."""
    import json

    analysis = run.analysis
    return atomic_write(run.dir / "verdict.json",
                        json.dumps({"level": analysis.level, "verdicts": analysis.verdicts}, indent=2) + "\n")


def render_console(run: Run, console: Console) -> None:
    """The tables, then the verdict in a few lines a terminal shows whole (the full lists of
    tied and worse methods are in report.md, report.html and verdict.json)."""
    for title, frame in tables(run):
        table = Table(title=Text(printable(title)), title_justify="left")
        table.add_column("method", style="bold")
        for col in frame.columns:
            table.add_column(col, justify="right")
        for method, row in frame.iterrows():
            table.add_row(Text(printable(method)), *(_style(v) for v in row))
        console.print(table)
    for line in problems(run):
        console.print(Text(printable(line), style="yellow"), highlight=False)
    for line in verdict_lines(run.analysis.verdicts, console.width):
        console.print(line, highlight=False)
    console.print(Text(f"results: {printable(run.dir)}"))


def verdict_lines(entries: list[dict[str, Any]], width: int = 80) -> list[Text]:
    """Per metric (its first value: FID, KID, the reference's RMSE) a heading, with the
    question it answers, its direction, n and real data's value; per budget two lines: the
    best method (value ± s.e., wall-clock), then how many tie with it (the first names that
    fit `width`, then "+N more") and how many are worse (in a race: the rounds they left in)."""
    lines: list[Text] = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in entries:
        if e.get("headline", True):  # not a metric's further values (PSNR beside RMSE, recall)
            groups.setdefault((e["model"], e["metric"]), []).append(e)
    models = len({e["model"] for e in entries}) > 1
    for (model, _), group in groups.items():
        e0 = group[0]
        where = f"{model}: " if models else ""
        answers = f", {e0['answers']}" if e0.get("answers") else ""
        lines.append(Text(printable(f"Verdict: {where}{e0['title']}{answers}"), style="bold"))
        n = f"raced up to n={e0['race']['n']}" if e0.get("race") else f"n={e0.get('n')}"
        floor = f"; real data {fmt(e0['floor']['value'], e0['floor'].get('std'))}" if e0.get("floor") else ""
        better = "higher" if e0["higher_is_better"] else "lower"
        lines.append(Text(printable(f"  {better} is better, {n}{floor}")))
        for e in group:
            best = e["methods"][e["best"]]
            first = f"  NFE {e['nfe']:>3}  best {e['best']} {fmt(best['point'], best.get('std'))}"
            if best.get("wall_s") is not None:
                first += f" ({best['wall_s']:.3g} s)"
            tied = sorted(e["tied"], key=lambda m: e["methods"][m]["point"], reverse=e["higher_is_better"])
            worse = f" · worse {len(e['worse'])}{left_rounds(e)}"
            lines.append(Text(printable(first)))
            ties = names_that_fit(f"tied {len(tied)}", tied, worse, width - 11)
            lines.append(Text(printable(" " * 11 + ties)))
    if lines:
        lines.append(Text(printable(VERDICT_NOTE_SHORT), style="dim"))
    return lines


def left_rounds(entry: dict[str, Any]) -> str:
    """` (left in round 1: 30, 2: 5)` for a raced budget whose methods left, else ``."""
    left = (entry.get("race") or {}).get("left") or {}
    rounds: dict[int, int] = {}
    for where in left.values():
        rounds[where["round"]] = rounds.get(where["round"], 0) + 1
    counts = ", ".join(f"{r}: {k}" for r, k in sorted(rounds.items()))
    return f" (left in round {counts})" if rounds else ""


def names_that_fit(head: str, names: list[str], tail: str, width: int) -> str:
    """`head: a, b, +N more` + `tail`, with as many names as fit in `width` characters."""
    if not names:
        return f"{head}{tail}"
    for k in range(len(names), -1, -1):
        more = f", +{len(names) - k} more" if k < len(names) else ""
        text = f"{head}: {', '.join(names[:k])}{more}{tail}" if k else f"{head}{tail}"
        if len(text) <= width or k == 0:
            return text
    return f"{head}{tail}"


VERDICT_NOTE_SHORT = (f"Tied: not significantly worse than the best at level {LEVEL} (paired bootstrap, "
                      "Holm); the full lists are in report.md, report.html and verdict.json.")


def _style(text: str) -> Text:
    return Text(printable(text), style={"infeasible": "dim", "failed": "red"}.get(text, ""))


def samples_per_cell(config: dict[str, Any]) -> str:
    """`256`, or for a race `raced from 256 to 2048`."""
    race = config.get("race")
    if isinstance(race, dict):
        return f"raced from {config.get('num_samples')} to {race.get('max_samples')}"
    return str(config.get("num_samples"))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings, index first."""
    head = [frame.index.name or "", *map(str, frame.columns)]
    rows = [[str(i), *map(str, row)] for i, row in zip(frame.index, frame.to_numpy(), strict=True)]
    align = ["---"] + ["---:"] * len(frame.columns)
    head, *rows = [[md_escape(c) for c in r] for r in [head, *rows]]
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, align, *rows])


def md_escape(text: str) -> str:
    """Text for Markdown (a table cell, a heading, a list item): control characters shown as
    escapes, HTML escaped (a sampler option `<script>` stays text), Markdown's own marks
    escaped (a name cannot close a table, open a heading or a link)."""
    text = escape(printable(text), quote=False)
    return "".join("\\" + c if c in MD_SPECIAL else c for c in text)


MD_SPECIAL = set("\\`*_[]|")  # emphasis, code, links, table cells; numbers stay as written


def md_code(text: str) -> str:
    """Inline code whose backtick fence is longer than any run of backticks inside it."""
    text = printable(text)
    fence = "`" * (1 + max((len(r) for r in re.findall("`+", text)), default=0))
    return f"{fence} {text} {fence}"


def render_csv(run: Run, console: Console) -> Path:
    return atomic_write(run.dir / "results.csv", run.frame().to_csv(index=False))


def render_markdown(run: Run, console: Console) -> Path:
    cfg = run.config
    env = cfg.get("environment", {})
    lines = [f"# sampler-bench run {md_code(run.dir.name)}", ""]
    if cfg.get("command"):
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall("`+", str(cfg["command"]))), default=0))
        lines += [fence, printable(cfg["command"]), fence, ""]
    lines += [
        f"Samples per cell: {samples_per_cell(cfg)}, seed {cfg.get('seed')}, "
        f"device {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
        f"commit {env.get('commit')}.",
        "",
    ]
    frame = verdict_frame(run.analysis.verdicts)
    if len(frame):
        lines += ["## Verdict", "", markdown_table(frame), "", VERDICT_NOTE, ""]
    for title, frame in tables(run):
        lines += [f"## {md_escape(title)}", "", markdown_table(frame), ""]
    issues = problems(run)
    if issues:
        lines += ["## Cells that are not ok", ""] + [f"- {md_escape(line)}" for line in issues] + [""]
    plugins = env.get("plugins", {})
    if isinstance(plugins, dict) and plugins:
        lines += ["## Plugins", ""] + [f"- {md_escape(f'{d} {v}')}" for d, v in sorted(plugins.items())]
        lines += [""]
    return atomic_write(run.dir / "report.md", "\n".join(lines))


def metric_frame(records: list[dict[str, Any]], metric: str, marks=None) -> pd.DataFrame:
    """A metric's (or record field's) method x NFE table with the verdict's marks, and real
    data's row (what a perfect sampler would score at this n) when it is known."""
    marks = marks or {}
    frame = grid_frame(records, lambda r: marks.get((r.get("cell_id"), metric), "") + cell_text(r, metric))
    floor = floor_of(records, metric)
    if floor is not None:
        frame.loc[FLOOR_ROW] = fmt(floor["value"], floor.get("std"))
    return frame
