"""Fail unless `bench plugins` in an environment built from wheels lists every distribution
of this repository (the host and each plugins/*/pyproject.toml) without an error.

    python .ci/check_plugins.py VENV_BIN

A wheel that lost its entry point is missing from the list; one that lost a module or a
data file its plugin imports shows the import error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def expected() -> set[str]:
    """The distribution names of the host and of every first-party plugin."""
    projects = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    return {tomllib.loads(p.read_text())["project"]["name"] for p in projects}


def main(venv_bin: Path) -> int:
    listing = subprocess.run(
        [str(venv_bin / "bench"), "plugins", "--json"], capture_output=True, text=True, cwd="/", check=True
    ).stdout
    plugins = json.loads(listing)
    found = {p["dist"] for p in plugins}
    problems = [f"{p['dist']}: {p['error']}" for p in plugins if p["error"]]
    missing = sorted(expected() - found)
    problems += [f"{dist}: not listed (no `bench` entry point in its wheel?)" for dist in missing]
    for line in problems:
        print(f"plugin check FAILED: {line}", file=sys.stderr)
    if not problems:
        print(f"plugin check passed: {', '.join(sorted(found))} load from their wheels")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
