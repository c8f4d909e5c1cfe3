"""Fixtures for bench-classic's tests: the installed plugins, one CPU thread, a solve helper."""

from __future__ import annotations

import pytest
import torch

from bench import CellSpec, CountingDenoiser, Method, Spec, resolve
from bench.testing import load_registry


@pytest.fixture(scope="session")
def registry():
    """The installed plugins, discovered through their entry points."""
    return load_registry()


@pytest.fixture(autouse=True)
def one_thread():
    """These tests work on tiny tensors: one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def solve(registry):
    """`solve(model, "name:key=value", nfe, eps)`: the cell's recipe (bench.resolve: options,
    plan, the sampler's default or the given schedule's sigmas on `model`), sampled from
    sigma_max * eps under the real NFE counter; returns (x0, sigmas, counted NFE)."""

    def run(model, text, nfe, eps, *, schedule=None, noise=None, **options):
        spec = Spec.parse(text)
        schedule = schedule or registry.get("samplers", spec.name).default_schedule
        method = Method(Spec(spec.name, (*spec.options, *options.items())), Spec.parse(schedule))
        recipe = resolve(registry, CellSpec("test", method, nfe), model, "cpu")
        counted = CountingDenoiser(model, budget=nfe)
        x_T = eps * recipe.sigmas[0].to(eps.dtype)
        x0 = recipe.sampler.sample(counted, x_T, recipe.sigmas, noise=noise, **recipe.options)
        return x0, recipe.sigmas, counted.nfe

    return run
