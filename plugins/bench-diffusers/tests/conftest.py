"""Fixtures for bench-diffusers' tests: the installed plugins, one CPU thread."""

from __future__ import annotations

import pytest
import torch

import bench


@pytest.fixture(scope="session")
def registry():
    """The installed plugins, discovered through their entry points."""
    return bench.registry()


@pytest.fixture(autouse=True)
def one_thread():
    """These tests work on tiny tensors: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """diffusers' own numpy-2 and deprecation notices (one per set_timesteps) are not ours."""
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:diffusers")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning:diffusers")
