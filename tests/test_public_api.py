"""The public API, pinned: what `bench` exports and the names of the public modules the
README documents ("Writing and publishing a plugin"), each against an explicit list, so that
a rename or a removal is a deliberate change here; every exported name imports; the
deprecated aliases still import, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).parents[1]

BENCH = [
    "__version__", "hookimpl",
    # the contracts
    "Batch", "Denoiser", "DenoiserWrapper", "Metric", "MetricContext", "MetricState", "ModelSource",
    "Modifier", "NoiseFn", "Plan", "Reporter", "Sampler", "Schedule", "Value",
    # the errors
    "BenchError", "BudgetExceeded", "Infeasible", "ModelLoadError", "NotApplicable", "PluginError",
    "UsageError",
    # options
    "Spec", "cast_like", "digest", "parse_pairs", "resolve_options",
    # one cell: its identity, recipe and solve
    "CellSpec", "Method", "Recipe", "Solve", "build", "load_model", "resolve",
    # plugins
    "deferred", "register_all", "registry",
    # runs, their directories and analysis
    "DEFAULTS", "DEFAULT_MODEL", "RunConfig", "parse_nfe", "load", "run", "Run", "Analysis", "analyse",
    "Bootstrapped",
    # files and caches
    "atomic_write", "cache_dir", "fingerprint", "writable_dir", "writable_file",
    # models, counting, noise
    "Declared", "CountingDenoiser", "SampleNoise",
]

# The public modules' names the README documents
MODULES = {
    "bench.solvers": ["ADAMS_BASHFORTH", "afs_d", "dpmpp_step", "euler_step", "heun_step", "plan_steps",
                      "switch", "to_d", "unipc_coefficients"],
    "bench.adapters": ["DiscreteVP", "Flow", "Preconditioned"],
    "bench.errors": ["BenchError", "BudgetExceeded", "Infeasible", "ModelLoadError", "NotApplicable",
                     "PluginError", "UsageError"],
    "bench.cli": ["main"],
    "bench.stats": ["Bootstrapped", "bootstrap_b", "counts", "index_sets", "paired_interval", "std_of",
                    "verdict"],
}
TESTING = [
    # the conformance suite
    "BUDGETS", "SEED", "SHAPE", "Case", "Solved", "check_batch_invariance", "check_convergence",
    "check_determinism", "check_modifier", "check_moments", "check_nfe", "check_planner", "check_protocol",
    "check_sampler", "check_schedule", "check_shapes", "ode_error", "registered_by", "registry",
    "samplers_of", "schedules_of", "single_threaded", "solve",
    # what a plugin's tests build on
    "EDMNetwork", "UNet", "UNetConfig", "console_width", "digits_features", "digits_images",
    "digits_reference_features", "gaussian", "load_registry", "methods_from", "mixture", "parse_command",
    "random_unet", "reference_solve", "run_records", "to_uint8",
]


def test_bench_exports_exactly_the_listed_names():
    assert sorted(bench.__all__) == sorted(BENCH)
    assert len(set(bench.__all__)) == len(bench.__all__)


@pytest.mark.parametrize("name", BENCH)
def test_every_exported_name_imports(name):
    namespace: dict = {}
    exec(f"from bench import {name}", namespace)
    assert namespace[name] is getattr(bench, name) is not None


def test_the_public_modules_hold_their_documented_names():
    for module, names in MODULES.items():
        imported = importlib.import_module(module)
        missing = [n for n in names if not hasattr(imported, n)]
        assert not missing, f"{module} lost {missing}"
    import bench.testing

    assert sorted(bench.testing.__all__) == sorted(TESTING)
    assert all(getattr(bench.testing, n) is not None for n in TESTING)


def test_the_readme_documents_the_public_api():
    """The plugin-API table names every public module and every name `bench` exports, and each
    name it gives a module resolves."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing and publishing a plugin"):text.index("### The conformance suite")]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([\w.]+)` \| (.*) \|$", section, re.M)}
    assert set(rows) == {"bench", "bench.solvers", "bench.adapters", "bench.testing", "bench.errors",
                         "bench.cli.main", "bench.stats"}
    documented = set(re.findall(r"`(\w+)", rows["bench"]))
    assert set(BENCH) <= documented, sorted(set(BENCH) - documented)
    for module in ("bench.solvers", "bench.adapters"):
        for name in re.findall(r"`(\w+)`", rows[module]):
            if name != "alphas_cumprod":  # a DiscreteVP argument
                assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


@pytest.mark.parametrize(
    "statement, name",
    [
        ("from bench.loaders import Declared", "Declared"),  # a 0.1 factory's import
        ("from bench.store import Run", "Run"),
        ("from bench.store import atomic_write", "atomic_write"),
        ("from bench.api import config_from", "config_from"),
    ],
)
def test_deprecated_aliases_import_and_warn(statement, name):
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(statement, namespace)
    assert namespace[name] is not None
    assert [w.category for w in caught] == [DeprecationWarning], [str(w.message) for w in caught]
    assert "deprecated" in str(caught[0].message)
