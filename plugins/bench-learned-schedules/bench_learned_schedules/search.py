"""The schedules' search stage: find the cached result for this cell, or search and cache it.

A cell's build calls `fit(n, sigma_min, sigma_max, *, to_zero, denoiser, device, cell,
**options)` on a counting model outside the budget (bench.Schedule.fit): the search's calls
and seconds become the record's schedule_fit_nfe and schedule_fit_s, and what `fit`
returns besides the sigmas its schedule_fitted. `cell` names the sampler that will use the
schedule; `solver=auto` searches with it when it is a search solver (students.SOLVERS),
else with iPNDM. With to_zero the search covers the n - 1 steps to sigma_min and a 0 is
appended.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.errors import UsageError

from . import cache, dmn, gits, ld3
from .students import DEFAULT_SOLVER, SOLVERS, check_solver

OPTION_TYPES = {"gits": gits.GitsOptions, "ld3": ld3.LD3Options, "dmn": dmn.DMNOptions}


def solver_of(wanted: str, cell: Mapping[str, Any] | None, steps: int) -> tuple[str, dict[str, Any]]:
    """The search solver and the options of it that change its arithmetic: the cell's own
    sampler's options when it is that sampler, else the registered sampler's defaults."""
    sampler = (cell or {}).get("sampler")
    name = (sampler if sampler in SOLVERS else DEFAULT_SOLVER) if wanted == "auto" else check_solver(wanted)
    if sampler == name:
        given = dict(cell.get("sampler_options") or {})
    else:
        try:
            from bench import registry

            given = dict(registry().get("samplers", name).options)
        except Exception:  # the sampler is not installed: the students' own defaults
            given = {}
    options = {k: given[k] for k in SOLVERS[name] if k in given}
    if options.get("variant") == "auto":  # UniPC's rule (bench-classic): bh1 below 10 steps
        options["variant"] = "bh1" if steps < 10 else "bh2"
    return name, options


@dataclass
class Search:
    """A cell's search: its cache key, the search's options, the solver it searches with and
    that solver's options, and the steps it places (n, less the step to 0 under to_zero)."""

    key: dict[str, Any]
    options: Any  # gits.GitsOptions, ld3.LD3Options or dmn.DMNOptions
    solver: str
    solver_options: dict[str, Any]
    steps: int


def search_of(method: str, n: int, to_zero: bool, denoiser, cell, options) -> Search | None:
    """The search of a cell's `n` steps; None when there is none to place (one step to 0)."""
    m = n - int(to_zero)
    if m < 1:
        return None
    fields = {k: v for k, v in options.items() if k != "solver"}
    try:
        search_options = OPTION_TYPES[method](**fields)
    except TypeError as exc:
        raise UsageError(f"schedule '{method}': {exc}") from None
    if hasattr(search_options, "start"):  # a fixed start inside the model's range
        ld3.start_of(search_options.start, float(denoiser.sigma_min), float(denoiser.sigma_max), method)
    solver, solver_options = solver_of(options.get("solver", "auto"), cell, m)
    key = cache.cache_key(method, denoiser, m, to_zero, solver, solver_options, search_options.to_json())
    return Search(key, search_options, solver, solver_options, m)


def lookup(key, force: bool = False) -> tuple[list[float] | None, str, list[str]]:
    """(sigmas, source, notes): the packaged entry, then the user cache."""
    notes = []
    for source, directory in () if force else (("packaged", cache.PACKAGED), ("cache", cache.cache_dir())):
        sigmas, status = cache.load(directory / cache.entry_name(key), key)
        if sigmas is not None:
            return sigmas, source, notes
        if status != "missing":
            notes.append(f"{source} entry {status}")
    return None, "", notes


def run_search(method: str, denoiser, to_zero: bool, search: Search, device):
    """The method's search on the (counting) model: (sigmas, stats)."""
    smin, smax = float(denoiser.sigma_min), float(denoiser.sigma_max)
    m, solver, solver_options, options = search.steps, search.solver, search.solver_options, search.options
    if method == "gits":
        return gits.search(denoiser, m, smin, smax, solver, solver_options, options, device)
    if method == "ld3":
        return ld3.search(denoiser, m, smin, smax, to_zero, solver, solver_options, options, device)
    return dmn.search(m, smin, smax, solver, solver_options, options)


def fit(method: str, n: int, sigma_min: float, sigma_max: float, *, to_zero: bool = False, denoiser=None,
        device="cpu", cell: Mapping[str, Any] | None = None, force: bool = False, out: Path | None = None,
        **options) -> tuple[torch.Tensor, dict[str, Any]]:
    """The cell's searched sigmas (packaged, cached or searched now, then cached) and what the
    record says of them. `force` searches whatever exists; `out` is where a search is written
    (default the cache), and a valid entry found elsewhere is copied there too."""
    if denoiser is None:
        raise UsageError(f"schedule '{method}' is searched on a model; it needs the denoiser")
    search = search_of(method, n, to_zero, denoiser, cell, options)
    if search is None:  # one step to 0
        return finish([float(sigma_max)], to_zero, device), {"source": "none: no step to search"}
    entry = cache.entry_name(search.key)
    info = {"search_solver": search.solver, "file": entry}
    sigmas, source, notes = lookup(search.key, force)
    if sigmas is not None:
        if (
            out is not None
            and Path(out).resolve()
            != (cache.PACKAGED if source == "packaged" else cache.cache_dir()).resolve()
        ):
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(
                (cache.PACKAGED if source == "packaged" else cache.cache_dir()) / entry, Path(out) / entry
            )
        return finish(sigmas, to_zero, device), {**info, "source": source}
    # Search, then store
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":  # small tensors: a second thread buys little on a shared CPU
        torch.set_num_threads(1)
    try:
        sigmas, stats = run_search(method, denoiser, to_zero, search, device)
    finally:
        torch.set_num_threads(threads)
    stats = {**stats, "search_s": time.perf_counter() - start, "calls": int(getattr(denoiser, "nfe", 0))}
    source = f"searched ({'; '.join(notes)})" if notes else "searched"
    try:
        cache.save((Path(out) if out is not None else cache.cache_dir()) / entry, sigmas, search.key, stats)
    except OSError as exc:  # an unwritable cache costs a search next time, not the cell
        source += f", not cached: {exc}"
    plain = {k: v for k, v in stats.items() if isinstance(v, str | int | float | bool)}
    return finish(sigmas, to_zero, device), {**info, "source": source, **plain}


def finish(sigmas: list[float], to_zero: bool, device) -> torch.Tensor:
    """The sigmas as a tensor, with the final 0 under to_zero."""
    return torch.tensor(sigmas + [0.0] * int(to_zero), dtype=torch.float32, device=device)


def sigmas_fn(method: str) -> Callable[..., torch.Tensor]:
    """The Schedule's `sigmas`: `fit` without a cell (the default search solver)."""

    def sigmas(n, sigma_min, sigma_max, *, to_zero=False, denoiser=None, device="cpu", **options):
        return fit(
            method, n, sigma_min, sigma_max, to_zero=to_zero, denoiser=denoiser, device=device, **options
        )[0]

    return sigmas


def estimate(method: str, n: int, sigma_min: float, sigma_max: float, *, to_zero: bool = False, denoiser=None,
             device="cpu", cell=None, call_s: Callable[[int], float] | None = None,
             **options) -> dict[str, float] | None:
    """{"calls", "seconds"} of the search this cell would run, or None when it is cached (or
    there is none). `call_s(batch)` is the seconds of one forward pass at that batch size."""
    search = search_of(method, n, to_zero, denoiser, cell, options)
    if search is None or lookup(search.key)[0] is not None:
        return None
    if method == "gits":
        work = [(c, b, 1.0) for c, b in gits.calls(search.options)]
    elif method == "ld3":
        work = ld3.calls(search.options, search.steps, to_zero)
    else:
        work = []
    seconds = sum(c * f * (call_s(b) if call_s else 0.0) for c, b, f in work)
    return {"calls": sum(c for c, _, _ in work), "seconds": seconds}
