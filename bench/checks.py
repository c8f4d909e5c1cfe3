"""What the runner settles before a run's first cell: every name and option exists and every
budget is planned (`validate`), the grid fits this machine (`check_bounds`), the run
directory holds no other sweep (`check_same_sweep`), and, once per model, the forward pass
is timed (`Calibration`), every cell's sigmas are made, no cell's network time alone passes
the time limit (`check_time`) and what uncached fit stages will cost is said
(`fit_notices`). A refusal is one line, exit 2, before any work.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .cell import CellSpec, canonical_method, fit_estimates, resolve
from .config import DTYPES, IDENTITY_KEYS, MAX_NFE, RunConfig
from .contracts import Denoiser
from .errors import UsageError
from .nfe import synchronize
from .plugins import Registry
from .rundir import CONFIG, read_config


def validate(registry: Registry, config: RunConfig) -> None:
    """Every name and option exists, and every budget is planned, before anything runs."""
    from .metrics import check_options

    if config.num_samples < 1 or config.batch_size < 1:
        raise UsageError("--num-samples and --batch-size must be positive integers")
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype: '{config.dtype}' is not one of {', '.join(DTYPES)}")
    for model in config.models:
        registry.get("models", model.partition(":")[0])
    for name in config.metrics or []:
        registry.get("metrics", name)
    check_options(registry, config.metric_options)  # every --metric-option is read by some metric
    check_bounds(config)
    for method in config.methods:
        method = canonical_method(registry, method)  # every name and option exists
        for nfe in config.nfe:
            check_cell(registry, CellSpec("", method, nfe))  # every planner accepts its options


def check_cell(registry: Registry, spec: CellSpec, model: Denoiser | None = None, device=None) -> None:
    """The cell's recipe (and, given the model, its sigmas) made before any cell runs: an option
    its sampler or schedule rejects (UsageError) stops the run before work; an infeasible
    budget or a plugin's own failure is left to the cell, which records it."""
    try:
        resolve(registry, spec, model, device)
    except UsageError:
        raise
    except Exception:  # noqa: S110 -- the cell itself resolves again and records the failure
        pass


def check_bounds(config: RunConfig) -> None:
    """Budgets, sample counts and the time limit this machine can hold, checked before any work:
    a cell keeps its plan and sigmas (per NFE) and the bootstrap's [B, n] index sets and
    counts (16 B bytes per sample) in memory."""
    from .stats import bootstrap_b

    if not (math.isfinite(config.cell_timeout) and config.cell_timeout >= 0):
        raise UsageError(f"--cell-timeout: {config.cell_timeout}; give seconds >= 0 (0: no limit)")
    big = max(config.nfe, default=0)
    if big > MAX_NFE:
        raise UsageError(f"--nfe: {big} is past {MAX_NFE} network calls per sample, the most a cell may "
                         "spend (its plan and sigmas are held in memory); give a smaller budget")
    per_sample = 16 * max(bootstrap_b(config.metric_options), 1)
    memory = physical_memory()
    n, flag = (config.max_samples, "--max-samples") if config.race and config.max_samples else \
        (config.num_samples, "--num-samples")
    if memory and n * per_sample > memory / 2:
        raise UsageError(
            f"{flag}: {n} samples per cell need about {n * per_sample / 2**30:.3g} GiB for the bootstrap "
            f"alone, past half of this machine's {memory / 2**30:.3g} GiB of memory; give at most "
            f"{int(memory / 2 // per_sample)}")


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the system says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_same_sweep(out: Path, config: RunConfig) -> None:
    """A run directory holds one sweep: another configuration into it is a UsageError that
    names what differs (a rerun of the same one resumes)."""
    path = out / CONFIG
    if not path.exists():
        return
    stored = read_config(path)  # a corrupt one is a UsageError saying what to do
    mine = json.loads(json.dumps(config.identity()))
    changed = [k for k in IDENTITY_KEYS if mine.get(k) != stored.get(k)]
    if changed:
        k = changed[0]
        raise UsageError(
            f"--out {out} holds another sweep ({k}: {_short(stored.get(k))} there, {_short(mine.get(k))} "
            f"now{' and ' + str(len(changed) - 1) + ' more' if len(changed) > 1 else ''}); give a new --out, "
            "and join comparable sweeps with bench merge")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# --- Timing the model, once ------------------------------------------------------------------


class Calibration:
    """The model's forward pass timed once per batch size (the median of a few calls after a
    warm-up), for everything that needs it: the unit in which `bench check` judges speed
    (`calibration_s`, at the run's batch), the time-limit check and the fit-cost estimates."""

    def __init__(self, denoiser: Denoiser, device: torch.device, repeats: int = 5) -> None:
        self.denoiser, self.device, self.repeats = denoiser, device, repeats
        self.seconds: dict[int, float] = {}

    def __call__(self, batch: int) -> float:
        if batch not in self.seconds:
            self.seconds[batch] = calibrate(self.denoiser, batch, self.device, self.repeats)
        return self.seconds[batch]


def calibrate(denoiser: Denoiser, batch_size: int, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one forward pass at `batch_size`; a batch the device cannot hold is a
    UsageError saying to lower --batch-size."""
    x = torch.zeros(batch_size, *denoiser.shape, device=device)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first call warms up and is not counted
                synchronize(device)
                start = time.perf_counter()
                denoiser(x, denoiser.sigma_max / 2)
                synchronize(device)
                times.append(time.perf_counter() - start)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError | MemoryError) and "memory" not in str(exc).lower():
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UsageError(f"the model's forward pass on a batch of {batch_size} cannot allocate its memory "
                         f"on {device} ({type(exc).__name__}: {first}); lower --batch-size") from None
    return sorted(times[1:])[repeats // 2]


def check_time(config: RunConfig, specs: list[CellSpec], calibration_s: float, world_size: int) -> None:
    """Refuse, before they run, cells whose network time alone (the calibrated forward pass x
    NFE x rounds of batches) passes --cell-timeout: a lower bound, so they would fail anyway."""
    if not config.cell_timeout:
        return
    n = config.max_samples if config.race and config.max_samples else config.num_samples
    rounds = math.ceil(math.ceil(n / config.batch_size) / world_size)
    for spec in specs:
        need = calibration_s * spec.nfe * rounds
        if need > config.cell_timeout:
            raise UsageError(
                f"{spec.method.sampler} at NFE {spec.nfe} on {spec.model} needs at least {need:.0f} s of "
                f"network time ({calibration_s * 1e3:.3g} ms a call x {spec.nfe} NFE x {rounds} batches), "
                f"past --cell-timeout {config.cell_timeout:g} s; lower --nfe or --num-samples, or raise "
                "--cell-timeout (0: no limit)")


def fit_notices(registry: Registry, specs: list[CellSpec], model: Denoiser, device,
                calibration: Calibration) -> dict[str, list[str]]:
    """{cell id: lines} for the cells whose fit stage (a searched schedule's search, a
    sampler's prepare) is not cached, with its estimated network calls and seconds (forward
    passes timed by `calibration` at the fit's batch sizes); {} without timing anything when
    no cell has one."""

    def staged(spec: CellSpec) -> bool:
        sampler = registry.get("samplers", spec.method.sampler.name)
        schedule = registry.get("schedules", spec.method.schedule.name) if spec.method.schedule else None
        return sampler.estimate is not None or (schedule is not None and schedule.estimate is not None)

    notices: dict[str, list[str]] = {}
    for spec in filter(staged, specs):
        try:
            lines = fit_estimates(resolve(registry, spec, model, device), model, device, calibration)
        except Exception:  # noqa: S112 -- the cell itself reports what is wrong
            continue
        if lines:
            notices[spec.id] = lines
    return notices
