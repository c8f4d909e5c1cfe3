"""The Python API: `bench.run(...)` and `bench.load(run_dir)`, with the CLI's option names
and defaults (`bench run --num-samples 64` is `bench.run(num_samples=64)`; bench.config).

Both return a pandas DataFrame with the columns of results.csv, one row per cell; the run
directory is `frame.attrs["run_dir"]`. The command line builds its run the same way
(`bench.config.config_from`), so the two give the same cells and the same numbers.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

# Deprecated since 0.3: the configuration's names lived here before bench.config; they still
# import from here, with a DeprecationWarning, until 0.4 (public ones from bench itself)
MOVED = ("DEFAULT_MODEL", "DEFAULT_REPORTERS", "DEFAULTS", "config_from", "methods_from", "metric_options",
         "parse_nfe", "parse_seeds", "prompt_set_digest", "seconds", "split_specs")


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module 'bench.api' has no attribute '{name}'")
    new = f"bench.{name}" if name in ("DEFAULT_MODEL", "DEFAULTS", "parse_nfe") else f"bench.config.{name}"
    warnings.warn(f"bench.api.{name} is deprecated since 0.3; use {new}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(".config", __package__), name)


def run(**options: Any):
    """Run a grid as `bench run` does (same option names and defaults; lists may replace
    comma strings) and return its results as a DataFrame, `attrs["run_dir"]` its directory.
    Reporters named by `report` render as on the command line (`report=""` for none)."""
    from rich.console import Console

    from .config import DEFAULT_REPORTERS, comma_list, config_from
    from .plugins import registry
    from .rundir import Run
    from .runner import run as run_grid

    reg = registry()
    args = " ".join(f"{k}={v!r}" for k, v in options.items())
    config = config_from(reg, command=f"bench.run({args})", **options)
    report = options.get("report", DEFAULT_REPORTERS)
    reporters = [reg.get("reporters", name) for name in comma_list("--report", report)] if report else []
    run_dir, _ = run_grid(reg, config)
    result, console = Run.open(run_dir), Console(highlight=False)
    for reporter in reporters:
        reporter.render(result, console)
    return _frame(result)


def load(run_dir: str | Path):
    """A finished run's results as the DataFrame `bench.run` returns."""
    from .rundir import Run

    return _frame(Run.open(run_dir))


def _frame(result):
    frame = result.frame()
    frame.attrs["run_dir"] = Path(result.dir)
    return frame
