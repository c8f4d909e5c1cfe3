"""`bench plugin new NAME`: a new plugin distribution that installs and passes its tests.

It writes NAME/ with a pyproject.toml declaring the `bench` entry point, a package with one
working sampler (Euler's method, to be replaced by yours), a README on developing and
publishing it, and tests that run the conformance suite (`bench.testing`) on every sampler
the distribution registers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from string import Template

from .errors import UsageError

DIST_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "sampler-bench plugin: the $sampler sampler"
readme = "README.md"
requires-python = ">=3.11"
license = "MIT"
# bench-classic provides the karras schedule this sampler takes by default
dependencies = ["sampler-bench>=0.2", "bench-classic>=0.1", "torch>=2.2"]

[project.optional-dependencies]
test = ["pytest>=8"]

# sampler-bench discovers plugins through this entry-point group
[project.entry-points.bench]
$package = "$package.plugin"

[tool.setuptools.packages.find]
include = ["$package*"]
"""

INIT = '''\
"""$dist: a sampler-bench plugin."""
'''

PLUGIN = '''\
"""Registers $dist's samplers with sampler-bench (entry point group `bench`).

Import-light: `bench --help` imports every plugin's entry module, so the samplers (and
torch with them) are imported when the hook runs, as sampler-bench's own plugins do.
"""

from bench import register_all

register_samplers = register_all("$package.sampler:SAMPLERS")
'''

SAMPLER = '''\
"""The $sampler sampler, in the sigma formulation of Karras et al. (2022, EDM).

x = x0 + sigma * eps; D(x, sigma) is the denoiser; the probability-flow ODE is
dx/dsigma = (x - D(x, sigma)) / sigma. The harness counts every call of `model` as one
NFE and stops a sampler that spends more than its plan.
"""

from __future__ import annotations

import torch
from bench import Plan, Sampler
from torch import Tensor


def plan(nfe: int, options) -> Plan:
    """One network call per step: NFE = steps (raise bench.errors.Infeasible for a budget
    your method cannot spend exactly)."""
    return Plan(steps=nfe, nfe=nfe)


@torch.no_grad()
def sample(model, x: Tensor, sigmas: Tensor, *, noise=None, callback=None, **options) -> Tensor:
    """Euler's method (EDM Algorithm 1 without the correction): 1 NFE per step."""
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        # Slope of the ODE at the current point
        d_cur = (x - model(x, s[i])) / s[i]
        # Step to the next sigma
        x = x + (s[i + 1] - s[i]) * d_cur
    return x


SAMPLERS = [
    Sampler(
        "$sampler",
        sample,
        plan,
        "NFE = steps",
        "Euler's method on the probability-flow ODE (replace with your method)",
        default_schedule="karras",  # from bench-classic, a declared dependency
    )
]
'''

TESTS = '''\
"""The sampler-bench conformance suite on every sampler $dist registers."""

import pytest
from bench.testing import check_sampler, samplers_of


@pytest.mark.parametrize("name", samplers_of("$dist"))
def test_sampler_conformance(name):
    check_sampler(name)
'''

README = """\
# $dist

A [sampler-bench](https://pypi.org/project/sampler-bench/) plugin: the `$sampler` sampler.

## Develop

    pip install -e .[test]
    bench plugins              # $dist is listed with what it registered
    bench list samplers        # $sampler, its NFE rule and default schedule
    bench run --samplers $sampler,euler --nfe 5,10,20
    pytest                     # the conformance suite on every sampler here

`$package/sampler.py` holds the method (`sample`) and its planner (`plan`: how a budget of
network calls maps to steps; raise `bench.errors.Infeasible` for a budget it cannot spend
exactly). `$package/plugin.py` registers it through the `bench` entry point declared in
`pyproject.toml`. A sampler that draws fresh noise declares `stochastic=True` and draws
only from the `noise` argument, so that every sample keeps its own seed.

## Publish

    python -m build            # dist/$package-0.1.0-py3-none-any.whl and the sdist
    twine upload dist/*

Once installed next to sampler-bench (`pip install $dist`), its samplers are found with no
further set-up.
"""

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "$package/__init__.py": INIT,
    "$package/plugin.py": PLUGIN,
    "$package/sampler.py": SAMPLER,
    "tests/test_conformance.py": TESTS,
}


def names(dist: str) -> dict[str, str]:
    """The distribution, its import package and its sampler: bench-foo -> bench_foo, foo."""
    if not DIST_RE.match(dist):
        raise UsageError(f"plugin name '{dist}' must be lowercase words joined by '-', e.g. bench-my-sampler")
    return {"dist": dist, "package": dist.replace("-", "_"), "sampler": dist.removeprefix("bench-")}


def new_plugin(dist: str, parent: Path, installed_samplers: list[str] = ()) -> Path:
    """Write the distribution `dist` into parent/dist; returns that directory."""
    fill = names(dist)
    if fill["sampler"] in installed_samplers:
        raise UsageError(f"a sampler named '{fill['sampler']}' is already installed; choose another name")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--dir {parent} is a file, not a directory; give a directory")
    root = parent / dist
    if root.exists():
        raise UsageError(f"{root} exists; choose another name or directory")
    for path, text in FILES.items():
        target = root / Template(path).substitute(fill)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Template(text).substitute(fill))
    return root


def add_plugin_command(subparsers) -> None:
    """`bench plugin new NAME [--dir DIR]`."""
    p = subparsers.add_parser("plugin", help="plugin author's tools: `bench plugin new NAME`")
    actions = p.add_subparsers(dest="action", required=True)
    new = actions.add_parser(
        "new", help="write a new plugin distribution NAME/ (installs and passes its tests)"
    )
    new.add_argument("name", help="distribution name, e.g. bench-my-sampler")
    new.add_argument("--dir", type=Path, default=Path("."), help="where to create it (default: here)")
    new.set_defaults(func=cmd_plugin_new)


def cmd_plugin_new(registry, args: argparse.Namespace) -> int:
    root = new_plugin(args.name, args.dir, registry.names("samplers"))
    print(f"wrote {root}; next: pip install -e '{root.resolve()}[test]' && pytest {root}")
    return 0
