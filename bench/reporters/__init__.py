"""The built-in reporters, registered like a third party's (bench.builtins): each renders a
finished run from its records and the analysis the run computes once (`run.analysis`).

    text.py   the console (tables, then the verdict in a few lines), results.csv, report.md,
              verdict.json, and the formatting they share
    html.py   report.html, with plots and sample grids inline

The renderers are imported when a run is rendered: pandas and matplotlib are slow to import,
and `bench list` needs neither.
"""

from __future__ import annotations

from importlib import import_module

from ..contracts import Reporter

# (name, module, function, description)
RENDERERS = (
    ("verdict", "text", "render_verdict", "verdict.json: per budget the best method and those tied with it "
                                          "(paired)"),
    ("console", "text", "render_console", "tables on the terminal (rich), then the verdict"),
    ("csv", "text", "render_csv", "results.csv: one row per cell, stable columns"),
    ("markdown", "text", "render_markdown", "report.md: the verdict, the tables, environment and problems"),
    ("html", "html", "render_html", "report.html: the leaders' plot, verdict, tables, plots, sample grids "
                                    "(self-contained)"),
)


def deferred(module: str, function: str):
    """bench.reporters.<module>.<function>, imported when a run is rendered."""

    def render(run, console):
        return getattr(import_module(f".{module}", __name__), function)(run, console)

    return render


REPORTERS = tuple(Reporter(name, deferred(module, function), description)
                  for name, module, function, description in RENDERERS)
