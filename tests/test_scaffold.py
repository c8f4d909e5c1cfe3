"""`bench plugin new NAME` writes a distribution that installs and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cli
from bench.errors import UsageError
from bench.scaffold import names, new_plugin


def test_a_new_plugin_installs_and_passes_its_tests_unchanged(tmp_path):
    assert cli.main(["plugin", "new", "bench-zigzag", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "bench-zigzag"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "bench_zigzag/__init__.py",
        "bench_zigzag/plugin.py",
        "bench_zigzag/sampler.py",
        "pyproject.toml",
        "tests/test_conformance.py",
    ]
    # Build and install it as pip does (its wheel, entry point and all) into a directory
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(root),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (site / "bench_zigzag" / "sampler.py").is_file()
    entry_points = next(site.glob("bench_zigzag-0.1.0.dist-info")) / "entry_points.txt"
    assert "bench_zigzag = bench_zigzag.plugin" in entry_points.read_text()
    # Its own tests, run from elsewhere against the installed copy: the conformance suite
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_names_and_refusals(tmp_path, capsys):
    assert names("bench-my-sampler") == {
        "dist": "bench-my-sampler",
        "package": "bench_my_sampler",
        "sampler": "my-sampler",
    }
    for bad in ("Bench-X", "bench_x", "1bench", "bench--x", "bench-"):
        with pytest.raises(UsageError, match="lowercase words"):
            names(bad)
    with pytest.raises(UsageError, match="'euler' is already installed"):
        new_plugin("bench-euler", tmp_path, ["euler", "heun"])
    new_plugin("bench-once", tmp_path)
    with pytest.raises(UsageError, match="exists"):
        new_plugin("bench-once", tmp_path)
    assert cli.main(["plugin", "new", "Bad Name", "--dir", str(tmp_path)]) == 2
    assert "lowercase words" in capsys.readouterr().err
