"""sampler-bench: benchmark diffusion samplers by quality, counted NFE and wall-clock.

The public API is what this package exports (see `__all__`), plus the modules
`bench.solvers` (pieces samplers share), `bench.adapters` (networks as Denoisers),
`bench.testing` (the conformance kit), `bench.errors` and `bench.cli.main` (the command
line as a function). Plugins import nothing else. Names load on first use, so that
`bench --help` and `import bench` in a plugin's entry module cost no torch import.

    import bench
    frame = bench.run(samplers="euler,heun", nfe="5,10", num_samples=64)
    frame.attrs["run_dir"]                       # where results.jsonl and reports went
    bench.load(frame.attrs["run_dir"])           # the same DataFrame again
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("sampler-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

hookimpl = pluggy.HookimplMarker("bench")

# name -> the module that defines it, imported when the name is first asked for
_EXPORTS = {
    **dict.fromkeys(
        ("Batch", "Denoiser", "DenoiserWrapper", "Metric", "MetricContext", "MetricState", "ModelSource",
         "Modifier", "NoiseFn", "Plan", "Reporter", "Sampler", "Schedule", "Value"),
        "contracts",
    ),
    **dict.fromkeys(
        ("BenchError", "BudgetExceeded", "Infeasible", "ModelLoadError", "NotApplicable", "PluginError",
         "UsageError"),
        "errors",
    ),
    **dict.fromkeys(("Spec", "cast_like", "digest", "parse_pairs", "resolve_options"), "options"),
    **dict.fromkeys(("CellSpec", "Method", "Recipe", "Solve", "build", "load_model", "resolve"), "cell"),
    **dict.fromkeys(("deferred", "register_all", "registry"), "plugins"),
    **dict.fromkeys(("DEFAULTS", "DEFAULT_MODEL", "RunConfig", "parse_nfe"), "config"),
    **dict.fromkeys(("load", "run"), "api"),
    "Run": "rundir",
    **dict.fromkeys(("Analysis", "analyse"), "analysis"),
    "Bootstrapped": "stats",
    **dict.fromkeys(("atomic_write", "cache_dir", "fingerprint", "writable_dir", "writable_file"), "files"),
    "Declared": "models.factory",
    "CountingDenoiser": "nfe",
    "SampleNoise": "seeding",
}

__all__ = ["__version__", "hookimpl", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bench' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
