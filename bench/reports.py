"""Reporters: views of a finished run, rendered from its results.jsonl alone.

Every table has one row per method and one column per NFE budget; a cell shows the value
(± its standard error where the metric reports one), or `infeasible` / `failed`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from .contracts import Reporter
from .store import Run


def fmt(value: float | None, std: float | None = None) -> str:
    """4 significant digits, with ± std when given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.4g}"
    return f"{text} ± {std:.2g}" if std is not None else text


def cell_text(record: dict[str, Any], key: str) -> str:
    """What a table cell shows for `key` (a metric name, or a record field such as wall_s)."""
    status = record.get("status")
    if status != "ok":
        return status or ""
    if key in record.get("metrics", {}):
        v = record["metrics"][key]
        return fmt(v.get("value"), v.get("std"))
    return fmt(record.get(key))


def tables(run: Run) -> list[tuple[str, pd.DataFrame]]:
    """(title, method x NFE frame of strings) for each metric, wall-clock and counted NFE."""
    keys = [(m, _metric_title(run, m)) for m in run.metric_names()]
    keys += [("wall_s", "wall-clock s (sampling)"), ("model_s", "s inside the model"),
             ("nfe_counted", "NFE counted")]
    out = []
    for model in dict.fromkeys(r["model"] for r in run.records):
        records = [r for r in run.records if r["model"] == model]
        budgets = sorted({r["nfe"] for r in records})
        methods = list(dict.fromkeys(r["method"] for r in records))
        for key, title in keys:
            frame = pd.DataFrame("", index=methods, columns=[f"NFE {b}" for b in budgets])
            for r in records:
                frame.loc[r["method"], f"NFE {r['nfe']}"] = cell_text(r, key)
            frame.index.name = "method"
            prefix = f"{model}: " if len(set(r["model"] for r in run.records)) > 1 else ""
            out.append((prefix + title, frame))
    return out


def _metric_title(run: Run, name: str) -> str:
    """`fd (lower is better, n=1000)`: direction and sample count belong to the metric."""
    for r in run.records:
        v = r.get("metrics", {}).get(name)
        if v is not None:
            better = "higher" if v.get("higher_is_better") else "lower"
            n = f", n={v['n']}" if v.get("n") else ""
            return f"{name} ({better} is better{n})"
    return name


def problems(run: Run) -> list[str]:
    """One line per cell that is not ok, or whose counted NFE differs from its budget."""
    lines = []
    for r in run.records:
        if r.get("status") != "ok" or r.get("reason"):
            lines.append(f"{r['method']} @ NFE {r['nfe']}: {r.get('status')}: {r.get('reason')}")
    return lines


def render_console(run: Run, console: Console) -> None:
    for title, frame in tables(run):
        table = Table(title=title, title_justify="left")
        table.add_column("method", style="bold")
        for col in frame.columns:
            table.add_column(col, justify="right")
        for method, row in frame.iterrows():
            table.add_row(method, *(_style(v) for v in row))
        console.print(table)
    for line in problems(run):
        console.print(f"[yellow]{line}[/yellow]", markup=True, highlight=False)
    console.print(f"results: {run.dir}")


def _style(text: str) -> str:
    return {"infeasible": "[dim]infeasible[/dim]", "failed": "[red]failed[/red]"}.get(text, text)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a frame of strings, index first."""
    head = [frame.index.name or "", *map(str, frame.columns)]
    rows = [[str(i), *map(str, row)] for i, row in zip(frame.index, frame.to_numpy())]
    align = ["---"] + ["---:"] * len(frame.columns)
    return "\n".join("| " + " | ".join(r) + " |" for r in [head, align, *rows])


def render_csv(run: Run, console: Console) -> Path:
    path = run.dir / "results.csv"
    run.frame().to_csv(path, index=False)
    return path


def render_markdown(run: Run, console: Console) -> Path:
    cfg = run.config
    env = cfg.get("environment", {})
    lines = [f"# sampler-bench run `{run.dir.name}`", ""]
    if cfg.get("command"):
        lines += ["```", cfg["command"], "```", ""]
    lines += [
        f"Samples per cell: {cfg.get('num_samples')}, seed {cfg.get('seed')}, "
        f"device {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
        f"commit {env.get('commit')}.",
        "",
    ]
    for title, frame in tables(run):
        lines += [f"## {title}", "", markdown_table(frame), ""]
    issues = problems(run)
    if issues:
        lines += ["## Cells that are not ok", ""] + [f"- {line}" for line in issues] + [""]
    plugins = env.get("plugins", {})
    if plugins:
        lines += ["## Plugins", ""] + [f"- {d} {v}" for d, v in sorted(plugins.items())] + [""]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines))
    return path


REPORTERS = [
    Reporter("console", render_console, "tables on the terminal (rich)"),
    Reporter("csv", render_csv, "results.csv: one row per cell, stable columns"),
    Reporter("markdown", render_markdown, "report.md: the tables, environment and problems"),
]
