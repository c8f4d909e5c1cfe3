"""Shared fixtures: real plugin distributions written to a directory on sys.path."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest


def write_distribution(root: Path, dist: str, code: str, version: str = "1.0") -> Path:
    """Write `<module>.py` and a `*.dist-info` whose entry_points.txt names it in group `bench`."""
    module = dist.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[bench]\nplugin = {module}\n")
    importlib.invalidate_caches()
    return root


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A directory on sys.path (and PYTHONPATH, for subprocesses) to install test plugins into.

    Call `plugin_site(dist, code)` to add a distribution; modules are forgotten afterwards.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    written: list[str] = []

    def add(dist: str, code: str, version: str = "1.0") -> Path:
        written.append(dist.replace("-", "_"))
        return write_distribution(root, dist, code, version)

    yield add
    for module in written:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
