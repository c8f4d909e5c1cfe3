"""Fixtures for bench-classic's tests: the installed plugins, one CPU thread, a solve helper."""

from __future__ import annotations

import pytest
import torch

from bench import Spec
from bench.cell import make_sigmas
from bench.contracts import resolve_options
from bench.nfe import CountingDenoiser
from bench.plugins import load_registry


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
    """`solve(model, "name:key=value", nfe, eps)`: plan the budget, build the sampler's default
    (or given) schedule on `model`, and sample from sigma_max * eps under the real NFE
    counter; returns (x0, sigmas, counted NFE)."""

    def run(model, text, nfe, eps, *, schedule=None, noise=None, **options):
        spec = Spec.parse(text)
        sampler = registry.get("samplers", spec.name)
        opts = resolve_options("sampler", spec.name, sampler.options, {**dict(spec.options), **options})
        plan = sampler.plan(nfe, opts)
        sched = Spec.parse(schedule or sampler.default_schedule)
        sched_fn = registry.get("schedules", sched.name)
        sched_opts = resolve_options("schedule", sched.name, sched_fn.options, dict(sched.options))
        sigmas = make_sigmas(sched_fn, sched_opts, plan, model, "cpu")
        counted = CountingDenoiser(model, budget=nfe)
        x_T = eps * sigmas[0].to(eps.dtype)
        x0 = sampler.sample(counted, x_T, sigmas, noise=noise, **{**opts, **plan.options})
        return x0, sigmas, counted.nfe

    return run
