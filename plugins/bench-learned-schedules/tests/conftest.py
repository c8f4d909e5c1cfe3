"""Fixtures: the installed plugins, and a fresh schedule cache for every test."""

from __future__ import annotations

import pytest
import torch

from bench.testing import load_registry


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """$BENCH_CACHE in a temporary directory: schedules searched by a test stay there."""
    root = tmp_path / "bench-cache"
    monkeypatch.setenv("BENCH_CACHE", str(root))
    return root / "learned-schedules"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

