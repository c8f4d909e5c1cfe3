"""report.html: one self-contained file, plots and sample grids inline; it opens with the
verdict's leaders against NFE and the verdict, then per metric its table and plots."""

from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from ..analysis import floor_of
from ..errors import printable
from ..files import atomic_write
from ..rundir import Run
from .text import (
    FLOOR_ROW,
    VERDICT_NOTE,
    _metric_title,
    cell_text,
    grid_frame,
    metric_frame,
    problems,
    record_keys,
    samples_per_cell,
    verdict_frame,
)

# --- HTML: one self-contained file, plots and sample grids inline -----------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
.plots img { width: 540px; border: 1px solid #eee; }
.grid img { image-rendering: pixelated; width: 160px; }
.env td { text-align: left; }
.bad { color: #b00; } .dim { color: #888; }
"""


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the (time, quality) points no other point beats on both, by time."""
    sign = -1 if higher_is_better else 1
    front, best = [], math.inf
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1])):
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return front


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_uri(fig) -> str:
    """A matplotlib figure as an inline PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return png_data_uri(buf.getvalue())


def _ok_points(records: list[dict[str, Any]], metric: str) -> dict[str, list[dict[str, Any]]]:
    """The ok records that report `metric`, grouped by method, ordered by budget."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["nfe"]):
        if r.get("status") == "ok" and metric in r.get("metrics", {}):
            by_method.setdefault(r["method"], []).append(r)
    return by_method


MARKERS = "osD^vP*Xph<>"


def method_style(index: int) -> dict[str, Any]:
    """Colour and marker of the index-th method: 20 colours x 12 markers stay distinct."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](index % 20), "marker": MARKERS[index % len(MARKERS)]}


def _legend(ax) -> None:
    """Below the axes, in columns, so that it never hides a point."""
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False)


def _axes(title: str, xlabel: str, ylabel: str, values: list[float]):
    """A figure on the Agg canvas (no pyplot state, no display), with labelled axes;
    a log quality axis when the values are positive and span more than a factor 10 (FID at
    5 NFE would otherwise squash 10 and 20 NFE into the bottom of the plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _floor_line(ax, records: list[dict[str, Any]], metric: str) -> None:
    floor = floor_of(records, metric)
    if floor is not None:
        ax.axhline(floor["value"], color="0.4", linestyle=":", label=FLOOR_ROW)


def plot_vs_nfe(records: list[dict[str, Any]], metric: str, title: str) -> str:
    """Quality against NFE budget, one line per method, error bars where reported."""
    groups = _ok_points(records, metric)
    values = [r["metrics"][metric]["value"] for rs in groups.values() for r in rs]
    fig, ax = _axes(f"{title} vs NFE", "NFE", title, values)
    for i, (method, rs) in enumerate(groups.items()):
        vs = [r["metrics"][metric] for r in rs]
        ax.errorbar(
            [r["nfe"] for r in rs],
            [v["value"] for v in vs],
            capsize=3,
            label=printable(method),
            yerr=[v.get("std") or 0 for v in vs],
            **method_style(i),
        )
    ax.set_xticks(sorted({r["nfe"] for r in records}))
    _floor_line(ax, records, metric)
    _legend(ax)
    return figure_uri(fig)


def plot_vs_wall(records: list[dict[str, Any]], metric: str, title: str) -> str:
    """Quality against sampling wall-clock, each cell a point, the Pareto front marked."""
    import matplotlib.ticker

    groups = _ok_points(records, metric)
    cells = [r for rs in groups.values() for r in rs]
    values = [r["metrics"][metric]["value"] for r in cells]
    fig, ax = _axes(f"{title} vs wall-clock", "sampling wall-clock (s)", title, values)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for i, (method, rs) in enumerate(groups.items()):
        xs, ys = [r["wall_s"] for r in rs], [r["metrics"][metric]["value"] for r in rs]
        ax.plot(xs, ys, linestyle="none", label=printable(method), **method_style(i))
        for r in rs:
            ax.annotate(
                str(r["nfe"]),
                (r["wall_s"], r["metrics"][metric]["value"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    # The Pareto front: no other cell is both faster and better
    higher = bool(cells and cells[0]["metrics"][metric].get("higher_is_better"))
    front = [
        cells[i] for i in pareto_front([(r["wall_s"], v) for r, v in zip(cells, values, strict=True)], higher)
    ]
    ax.plot(
        [r["wall_s"] for r in front],
        [r["metrics"][metric]["value"] for r in front],
        "k--",
        drawstyle="steps-post",
        marker="s",
        mfc="none",
        ms=11,
        label="Pareto front",
    )
    _floor_line(ax, records, metric)
    for r in front:  # the front's cells by name: the answer to "which, at what cost"
        ax.annotate(printable(f"{r['method']} @ {r['nfe']}"), (r["wall_s"], r["metrics"][metric]["value"]),
                    fontsize=7, xytext=(6, -10), textcoords="offset points", fontweight="bold")
    _legend(ax)
    return figure_uri(fig)


def plots_html(plots: list[tuple[str, str]]) -> str:
    """(alt text, data URI) pairs as a row of inline images."""
    images = "".join(f'<img src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">' for alt, uri in plots)
    return f'<div class="plots">{images}</div>'


def html_table(frame: pd.DataFrame, raw: bool = False, css: str = "") -> str:
    """A frame of strings as an HTML table, index first, failed/infeasible cells styled.

    With `raw` the cells are HTML already (inline images) and are not escaped.
    """
    head = "".join(f"<th>{escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    rows = []
    for index, row in zip(frame.index, frame.to_numpy(), strict=True):
        cells = "".join(f"<td{_css_class(v)}>{v if raw else escape(str(v))}</td>" for v in row)
        rows.append(f"<tr><th>{escape(str(index))}</th>{cells}</tr>")
    attr = f' class="{css}"' if css else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _css_class(text: str) -> str:
    return {"failed": ' class="bad"', "infeasible": ' class="dim"'}.get(text, "")


def grid_image(run: Run, record: dict[str, Any]) -> str:
    """A cell's sample grid (record field `grid`, relative to the run) as an inline image."""
    path = run.file(record.get("grid"))
    if path is None:
        return ""
    return f'<img src="{png_data_uri(path.read_bytes())}" alt="{escape(record["method"])}">'


def environment_html(run: Run) -> str:
    """The exact command, the environment and every plugin's version."""
    cfg = run.config
    env = cfg.get("environment", {})
    calibration = [r["calibration_s"] for r in run.records if r.get("calibration_s")]
    facts = {
        "device": f"{env.get('device')} ({env.get('device_name')})",
        "torch": env.get("torch"),
        "python": env.get("python"),
        "platform": env.get("platform"),
        "commit": env.get("commit"),
        "samples per cell": samples_per_cell(cfg),
        "batch size": cfg.get("batch_size"),
        "seed": cfg.get("seed"),
        "model forward (calibration)": f"{min(calibration):.4g} s" if calibration else None,
        **{f"plugin {d}": v for d, v in sorted(env.get("plugins", {}).items())},
    }
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in facts.items())
    command = f"<pre>{escape(cfg['command'])}</pre>" if cfg.get("command") else ""
    return f"<h2>Command and environment</h2>{command}<table class='env'><tbody>{rows}</tbody></table>"


def leaders(entries: list[dict[str, Any]], model: str, metric: str | None, most: int = 8) -> list[str]:
    """The methods a model's verdicts on `metric` rank first: each budget's best, then those
    tied with it by value, budget by budget, at most `most`."""
    chosen: dict[str, None] = {}
    for e in entries:
        if e["model"] == model and e["metric"] == metric:
            tied = sorted(e["tied"], key=lambda m: e["methods"][m]["point"], reverse=e["higher_is_better"])
            for m in [e["best"], *tied]:
                if len(chosen) < most:
                    chosen[m] = None
    return list(chosen)


def render_html(run: Run, console: Console) -> Path:
    """report.html: tables and plots per metric, sample grids, environment; self-contained."""
    groups, marks = run.analysis.pooled, run.analysis.marks
    body = [f"<h1>sampler-bench run <code>{escape(run.dir.name)}</code></h1>"]
    # First the answer: each model's leading methods against NFE, with real data's floor
    figures = []
    for model, records in groups.items():
        metric = next((m for r in records for m in r.get("metrics", {})), None)
        chosen = leaders(run.analysis.verdicts, model, metric)
        if chosen:
            name = next(r["metrics"][metric].get("title") for r in records if metric in r.get("metrics", {}))
            title = f"{model + ': ' if len(groups) > 1 else ''}{name or metric}, the verdict's leaders"
            figures.append((title, plot_vs_nfe([r for r in records if r["method"] in chosen], metric,
                                               name or metric)))
    if figures:
        body.append(plots_html(figures))
    frame = verdict_frame(run.analysis.verdicts, html=True)
    if len(frame):
        body += ["<h2>Verdict</h2>", html_table(frame, raw=True), f"<p>{escape(VERDICT_NOTE)}</p>"]
    body.append(environment_html(run))
    for model, records in groups.items():
        prefix = f"{model}: " if len(groups) > 1 else ""
        # Per metric: the method x NFE table, quality vs NFE, quality vs wall-clock
        for metric in dict.fromkeys(m for r in records for m in r.get("metrics", {})):
            title = _metric_title(run, metric)
            value = next(r["metrics"][metric] for r in records if metric in r.get("metrics", {}))
            name = value.get("title") or metric
            body += [f"<h2>{escape(prefix + title)}</h2>", html_table(metric_frame(records, metric, marks))]
            if value.get("headline", "metric" not in value):  # a metric's further values: the table alone
                pareto = f"{name} vs wall-clock, Pareto front marked and named"
                body.append(plots_html([(f"{name} vs NFE", plot_vs_nfe(records, metric, name)),
                                        (pareto, plot_vs_wall(records, metric, name))]))
        for key, title in record_keys(records):
            body += [
                f"<h2>{escape(prefix + title)}</h2>",
                html_table(grid_frame(records, lambda r, k=key: cell_text(r, k))),
            ]
        # The sample grids, where the run saved them
        grids = grid_frame(records, lambda r: grid_image(run, r))
        if any(v for v in grids.to_numpy().ravel()):
            body += [f"<h2>{escape(prefix)}sample grids</h2>", html_table(grids, raw=True, css="grid")]
    issues = problems(run)
    if issues:
        body += ["<h2>Cells that are not ok</h2><ul>"] + [f"<li>{escape(i)}</li>" for i in issues] + ["</ul>"]
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sampler-bench '
        f"{escape(run.dir.name)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    return atomic_write(run.dir / "report.html", page)
