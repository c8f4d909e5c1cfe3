"""Reporters: report.html is self-contained and renders in headless Chromium; report.md,
results.csv, the console and the HTML carry the same tables; `bench report` re-renders
from results.jsonl alone."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from rich.console import Console

from bench import Run
from bench.cli import main
from bench.reporters.html import pareto_front, render_html
from bench.reporters.text import tables
from bench.rundir import RESULTS

EXAMPLE = Path(__file__).parent / "data" / "compare" / "base"  # a real run, see its README
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """The example run, with a sample grid PNG per ok cell as the runner saves them."""
    out = tmp_path / "run"
    shutil.copytree(EXAMPLE, out)
    records = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    (out / "samples").mkdir()
    gen = torch.Generator().manual_seed(0)
    for r in records:
        if r["status"] == "ok":
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(out / "samples" / f"{r['cell_id']}.png")
            r["grid"] = f"samples/{r['cell_id']}.png"
    (out / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def html_of(run_dir: Path) -> str:
    return render_html(Run.open(run_dir), Console(file=io.StringIO())).read_text()


def test_bench_report_rerenders_from_results_alone(run_dir, capsys):
    before = (run_dir / RESULTS).read_bytes()
    # Exit code 1: the example holds a failed cell, which the reports show (below)
    assert main(["report", str(run_dir), "--report", "console,csv,markdown,html"]) == 1
    assert (run_dir / RESULTS).read_bytes() == before
    for name in ("results.csv", "report.md", "report.html"):
        assert (run_dir / name).stat().st_size > 0
    assert "heun @ NFE 4: failed: RuntimeError" in capsys.readouterr().out
    assert "heun @ NFE 4: failed: RuntimeError" in (run_dir / "report.html").read_text()


def test_html_is_self_contained_with_plots_grids_and_environment(run_dir):
    html = html_of(run_dir)
    run = Run.open(run_dir)
    # Nothing is fetched: every image is inline, no scripts or stylesheets from elsewhere
    assert not re.search(r"https?://|<link|<script", html)
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    # Two plots per metric (vs NFE, vs wall-clock), then one grid per ok cell, byte for byte
    ok = [r for r in run.records if r["status"] == "ok"]
    assert len(sources) == 2 * len(run.metric_names()) + len(ok)
    grids = {base64.b64decode(s.split(",", 1)[1]) for s in sources[-len(ok) :]}
    assert grids == {(run_dir / r["grid"]).read_bytes() for r in ok}
    # The exact command and the environment
    env = run.config["environment"]
    for fact in (run.config["command"], env["torch"], env["commit"], "bench-classic"):
        assert fact in html
    for metric in run.metric_names():
        assert f'alt="{metric} vs NFE"' in html
        assert f'alt="{metric} vs wall-clock, Pareto front marked and named"' in html


def test_markdown_csv_console_and_html_carry_the_same_tables(run_dir, capsys):
    main(["report", str(run_dir), "--report", "console,csv,markdown,html"])
    console = capsys.readouterr().out
    markdown = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    run = Run.open(run_dir)
    for title, frame in tables(run):
        assert f"## {title}" in markdown and title.split(" (")[0] in html
        for text in frame.to_numpy().ravel():
            assert f" {text} |" in markdown and f">{text}<" in html and text in console
    # results.csv holds the numbers behind the tables
    csv = pd.read_csv(run_dir / "results.csv")
    for r in run.records:
        row = csv[(csv.method == r["method"]) & (csv.nfe == r["nfe"])].iloc[0]
        for name, v in r.get("metrics", {}).items():
            assert row[name] == pytest.approx(v["value"])


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (0.5, 9.0), (2.0, 2.5)]
    assert pareto_front(points) == [4, 0, 5, 3]  # lower is better
    assert pareto_front(points, higher_is_better=True) == [4]
    assert pareto_front([]) == []


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    html_of(run_dir)
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        (run_dir / "report.html").as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    # Not blank: text, tables and plots give many colours and a fair share of non-white pixels
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100
    white = max(count for count, rgb in colours if rgb == (255, 255, 255))
    assert white < 0.97 * 1200 * 2000
