"""Fixtures: the installed plugins, and a fresh predictor cache for every test."""

from __future__ import annotations

import pytest

from bench.testing import load_registry


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """$BENCH_CACHE in a temporary directory: predictors fitted by a test stay there."""
    root = tmp_path / "bench-cache"
    monkeypatch.setenv("BENCH_CACHE", str(root))
    return root / "amed"


@pytest.fixture
def tiny_fit():
    """Options for a fit small enough for unit tests: few trajectories, the teacher on the
    student's own grid."""
    return {"fit_samples": 8, "fit_batch": 8, "fit_epochs": 1, "teacher_steps": 1}
