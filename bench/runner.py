"""The runner: a grid of cells (model x method x NFE budget), each run, measured and stored.

A method is a sampler with its options, a schedule and a chain of modifiers. Every cell
draws the same per-sample noise, spends at most its budget (the counter enforces it),
and ends as one record: ok, infeasible (with the planner's reason) or failed (with the
error); a failing cell never stops the run.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import DEFAULTS
from .cell import (
    SPEED_DEFAULTS,
    CellSpec,
    Method,
    Sampled,
    Solve,
    Spec,
    build,
    canonical_method,
    digest,
    load_model,
    make_sigmas,
    plan_cell,
    resolve_device,
    target_model,
)
from .contracts import Batch, Denoiser, MetricContext, resolve_options
from .distributed import DistributedError, World
from .errors import BenchError, Infeasible, ModelLoadError, PluginError, UsageError
from .images import SampleWriter, save_grid
from .metrics import check_applies, check_options, metric_set
from .nfe import synchronize
from .plugins import Registry
from .stats import bootstrap_b, index_sets
from .store import (
    CONFIG,
    FINAL,
    RESULTS,
    append_record,
    atomic_write,
    read_config,
    read_records,
    run_lock,
    writable_dir,
    write_json,
)
from .throughput import DTYPES, accelerate, full_precision

GRIDS = "samples"  # run subdirectory of each cell's PNG grid of its first samples
REPLICATES = "replicates"  # run subdirectory of each cell's paired bootstrap replicates (.npz)


# --- The cell time limit --------------------------------------------------------------
#
# A time limit on one cell (`bench run --cell-timeout SECONDS`).
#
# In the main thread of a process on a POSIX system the limit is a SIGALRM timer whose
# handler raises `CellTimeout` inside the running Python code: a sampler stuck in a Python
# loop or a sleep fails its cell and the run goes on. A single call into native code (one
# huge torch op) is interrupted only when it returns to Python. Where signals cannot be
# used (another thread, Windows) the limit is not enforced, and `time_limit_enforced()` says so.

DEFAULT_TIMEOUT_S = DEFAULTS["cell_timeout"]  # the default --cell-timeout: half an hour per cell


class CellTimeout(Exception):
    """A cell ran past its time limit."""


def time_limit_enforced() -> bool:
    """Whether a time limit can be enforced here: SIGALRM exists and this is the main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "the cell") -> Iterator[None]:
    """Raise CellTimeout inside the block once `seconds` have passed (None or 0: no limit;
    nothing is enforced where `time_limit_enforced()` is false)."""
    if not seconds or not time_limit_enforced():
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"{what} ran past --cell-timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class RunConfig:
    """Everything that defines a run; what identifies a cell is hashed into its id."""

    models: list[str]
    methods: list[Method]
    nfe: list[int]
    num_samples: int = 1000
    batch_size: int = 500
    seed: int = 0  # the first sample seed: the cells sample seeds seed .. seed + num_samples - 1
    threads: int = 1  # CPU threads of the network (torch.set_num_threads); not identity
    repeats: int = 1  # disjoint seed blocks per method x budget, each its own cell
    device: str = "cpu"
    metrics: list[str] | None = None
    out: Path | None = None
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. trust_pickle; not identity
    metric_options: dict[str, Any] = field(default_factory=dict)  # e.g. ref_stats; identity if set
    dtype: str = "fp32"  # autocast precision of the network: fp32, bf16 or fp16
    channels_last: bool = False
    compile: bool = False
    shard: tuple[int, int] = (0, 1)  # (i, n): this job runs the cells whose grid index is i mod n
    cell_timeout: float = DEFAULT_TIMEOUT_S  # seconds a cell may run (0: no limit); not identity
    save_samples: bool = False  # each cell's samples as uint8 images in samples/<cell_id>.npz; not identity
    prompts: str = ""  # the digest of the --prompts file (bench.conditioning); identity if set

    def identity(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "methods": sorted(
                [str(m.sampler), str(m.schedule), [str(x) for x in m.modifiers]]
                for m in self.methods
            ),
            "nfe": sorted(self.nfe),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metrics": self.metrics,
            "device": torch.device(self.device).type,
            **({"metric_options": self.metric_options} if self.metric_options else {}),
            **({"repeats": self.repeats} if self.repeats > 1 else {}),
            **({"prompts": self.prompts} if self.prompts else {}),
            # The network's speed options, where they differ from the defaults
            **{k: v for k, v in self.speed_options().items() if v != SPEED_DEFAULTS[k]},
        }

    def speed_options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "channels_last": self.channels_last, "compile": self.compile}

    def run_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.models[0])[:40]
        shard = f"-shard{self.shard[0]}of{self.shard[1]}" if self.shard[1] > 1 else ""
        return Path("reports") / f"{slug}-{digest(self.identity())[:8]}{shard}"


# --- Environment ---------------------------------------------------------------------


def environment(device: torch.device, registry: Registry) -> dict[str, Any]:
    """What a record says about where it ran."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "plugins": registry.versions(),
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


# --- Loading and validating ------------------------------------------------------------


def calibrate(denoiser: Denoiser, batch_size: int, device: torch.device, repeats: int = 5) -> float:
    """Median seconds of one forward pass at the run's batch size: the unit in which
    `bench check` judges speed, since absolute times differ between machines."""
    x = torch.zeros(batch_size, *denoiser.shape, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first call warms up and is not counted
            synchronize(device)
            start = time.perf_counter()
            denoiser(x, denoiser.sigma_max / 2)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def validate(registry: Registry, config: RunConfig) -> None:
    """Every name and option exists before anything runs."""
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
            check_cell(registry, method, nfe)  # every planner accepts its options


MAX_NFE = 100_000  # network calls per sample a cell may spend: its plan and sigmas live in memory


def check_bounds(config: RunConfig) -> None:
    """Budgets, sample counts and the time limit this machine can hold, checked before any work:
    a cell keeps its plan and sigmas (per NFE) and the bootstrap's [B, n] index sets and
    counts (16 B bytes per sample) in memory."""
    if not (math.isfinite(config.cell_timeout) and config.cell_timeout >= 0):
        raise UsageError(f"--cell-timeout: {config.cell_timeout}; give seconds >= 0 (0: no limit)")
    big = max(config.nfe, default=0)
    if big > MAX_NFE:
        raise UsageError(f"--nfe: {big} is past {MAX_NFE} network calls per sample, the most a cell may "
                         "spend (its plan and sigmas are held in memory); give a smaller budget")
    per_sample = 16 * max(bootstrap_b(config.metric_options), 1)
    memory = physical_memory()
    if memory and config.num_samples * per_sample > memory / 2:
        raise UsageError(
            f"--num-samples: {config.num_samples} samples per cell need about "
            f"{config.num_samples * per_sample / 2**30:.3g} GiB for the bootstrap alone, past half of this "
            f"machine's {memory / 2**30:.3g} GiB of memory; give at most {int(memory / 2 // per_sample)}")


def physical_memory() -> int | None:
    """This machine's memory in bytes, where the system says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


# --- Running --------------------------------------------------------------------------


Progress = Callable[[str, int, int], None]


def run(
    registry: Registry,
    config: RunConfig,
    on_cell: Callable[[CellSpec, dict[str, Any] | None], None] | None = None,
    on_batch: Progress | None = None,
    on_start: Callable[[CellSpec, list[str] | None], None] | None = None,
    on_notice: Callable[[dict[str, list[str]]], None] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run every cell not already finished in the run directory; return (dir, new records).

    Under torchrun every process runs this (bench.distributed): the cells' batches are
    shared out, rank 0 alone writes and returns the records, the other ranks return none.
    With `config.shard = (i, n)` only the cells whose grid index is i mod n run.
    """
    validate(registry, config)
    world = World.from_env()
    out = config.run_dir()
    if not world.main:
        return _run(registry, config, world, out, on_cell, on_batch, on_start, on_notice)
    with run_lock(writable_dir(out)):  # one writer per run directory
        try:
            return _run(registry, config, world, out, on_cell, on_batch, on_start, on_notice)
        except BenchError:  # refused before any cell stored: no config.json claims the directory
            if not (out / RESULTS).exists():
                (out / CONFIG).unlink(missing_ok=True)
            raise


def _run(registry: Registry, config: RunConfig, world: World, out: Path, on_cell, on_batch,
         on_start=None, on_notice=None) -> tuple[Path, list[dict[str, Any]]]:
    device = resolve_device(world.device(config.device))
    if device.type == "cpu":  # one thread by default: OpenMP spin-waits thrash on a shared CPU
        torch.set_num_threads(config.threads)
    env = {**environment(device, registry), "world_size": world.size, "threads": torch.get_num_threads()}
    done: dict[str, dict[str, Any]] = {}
    if world.main:
        check_same_sweep(out, config)
        write_json(out / CONFIG, {**config.identity(), "command": config.command, "batch_size":
                                  config.batch_size, "shard": list(config.shard), "environment": env,
                                  "cell_timeout": config.cell_timeout,
                                  "cell_timeout_enforced": cell_limit(config, world) is not None,
                                  **config.extra})
        done = {r["cell_id"]: r for r in read_records(out / RESULTS) if r.get("status") in FINAL}
    finished = world.broadcast(set(done))  # every rank skips the same cells
    new: list[dict[str, Any]] = []
    first = 0  # the grid index of the model's first cell: shards share out the whole grid
    for model_spec in config.models:
        # Rank 0 loads first: a download lands in the shared cache once
        plain = world.main_first(partial(load_model, model_spec, device, registry, config.model_options))
        denoiser = accelerate(plain, **config.speed_options())
        calibration_s = calibrate(denoiser, min(config.batch_size, config.num_samples), device)
        cache: dict[Any, Any] = {}
        # The model's parameterization, in config.json and every record
        model_info = json.loads(json.dumps(plain.describe(), default=str))
        if world.main:
            stored = json.loads((out / CONFIG).read_text())
            write_json(out / CONFIG, {**stored, "model_info": {**stored.get("model_info", {}),
                                                               model_spec: model_info}})
        specs = cell_specs(registry, config, model_spec, device, plain.default_schedule, plain)
        ours = [(first + k, spec) for k, spec in enumerate(specs)
                if (first + k) % config.shard[1] == config.shard[0]]
        first += len(specs)
        # Before the model's first cell: every cell's sigmas, and its time within the limit
        todo = [spec for _, spec in ours if spec.id not in finished]
        check_time(config, todo, calibration_s, world.size)
        for spec in todo:
            check_cell(registry, spec.method, spec.nfe, denoiser, device)
        # Before the model's first cell: every metric of its cells can score it
        check_applies(registry, metric_set(registry, config.metrics, model_spec, plain)[0], model_spec, plain,
                      {"num_samples": config.num_samples, "seed": config.seed, "device": device,
                       "cache": cache, "options": config.metric_options})
        # Before the model's first cell: what its uncached fit stages will cost, said once
        notices = fit_notices(registry, todo, denoiser, device) if on_notice and world.main else {}
        if notices:
            on_notice(notices)
        for index, spec in ours:
            if spec.id in finished:
                if on_cell and world.main:
                    on_cell(spec, done[spec.id])
                continue
            if on_start and world.main:
                on_start(spec, notices.get(spec.id))
            record = run_cell(registry, config, spec, denoiser, cache, device,
                              on_batch if world.main else None, world)
            if not world.main:
                continue
            record.update(cell_id=spec.id, cell_index=index, environment=env, calibration_s=calibration_s,
                          repeat=(spec.seed - config.seed) // config.num_samples, model_info=model_info)
            record = store(out, record)
            new.append(record)
            if on_cell:
                on_cell(spec, record)
    return out, new


def store(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append the cell's record; one that cannot be written (a full disk) comes back failed and
    `stored: False`, the file cut back to its last good line: a rerun runs the cell again."""
    try:
        append_record(out / RESULTS, record)
    except OSError as exc:
        return {**record, "status": "failed", "stored": False,
                "reason": f"its record could not be written: {type(exc).__name__}: {exc}"}
    return record


def cell_limit(config: RunConfig, world: World) -> float | None:
    """The seconds a cell may run, where that is enforced (`time_limit_enforced`): in the main thread
    of a one-process run; under torchrun a hung rank ends at BENCH_DIST_TIMEOUT instead."""
    if not config.cell_timeout or world.size > 1 or not time_limit_enforced():
        return None
    return config.cell_timeout


def check_time(config: RunConfig, specs: list[CellSpec], calibration_s: float, world_size: int) -> None:
    """Refuse, before they run, cells whose network time alone (the calibrated forward pass x
    NFE x rounds of batches) passes --cell-timeout: a lower bound, so they would fail anyway."""
    if not config.cell_timeout:
        return
    rounds = math.ceil(math.ceil(config.num_samples / config.batch_size) / world_size)
    for spec in specs:
        need = calibration_s * spec.nfe * rounds
        if need > config.cell_timeout:
            raise UsageError(
                f"{spec.method.sampler} at NFE {spec.nfe} on {spec.model} needs at least {need:.0f} s of "
                f"network time ({calibration_s * 1e3:.3g} ms a call x {spec.nfe} NFE x {rounds} batches), "
                f"past --cell-timeout {config.cell_timeout:g} s; lower --nfe or --num-samples, or raise "
                "--cell-timeout (0: no limit)")


def check_cell(registry: Registry, method: Method, nfe: int, denoiser: Denoiser | None = None,
               device: torch.device | None = None) -> None:
    """A cell's plan (and, given the model, its sigmas) made before any cell runs: an option
    its sampler or schedule rejects (UsageError) stops the run before work; an infeasible
    budget or a plugin's own failure is left to the cell, which records it."""
    sampler = registry.get("samplers", method.sampler.name)
    options = resolve_options("sampler", sampler.name, sampler.options, dict(method.sampler.options))
    try:
        plan = plan_cell(sampler, nfe, options)
        if denoiser is not None and method.schedule is not None:
            schedule = registry.get("schedules", method.schedule.name)
            sched_options = resolve_options("schedule", schedule.name, schedule.options,
                                            dict(method.schedule.options))
            make_sigmas(schedule, sched_options, plan, denoiser, device)
    except UsageError:
        raise
    except Exception:  # noqa: S110 -- the cell itself runs this again and records the failure
        pass


def check_same_sweep(out: Path, config: RunConfig) -> None:
    """A run directory holds one sweep: another configuration into it is a UsageError that
    names what differs (a rerun of the same one resumes)."""
    path = out / CONFIG
    if not path.is_file():
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


IDENTITY_KEYS = ("models", "methods", "nfe", "num_samples", "seed", "metrics", "device", "metric_options",
                 "dtype", "channels_last", "compile", "repeats", "prompts")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def cell_specs(registry: Registry, config: RunConfig, model_spec: str, device: torch.device,
               model_schedule: str | None = None, model: Denoiser | None = None) -> list[CellSpec]:
    """The model's cells in grid order: methods x budgets, each method in canonical form (a
    method that names no schedule gets the model's preferred one, `model_schedule`, if any).
    Their metrics are `metric_set`'s for the loaded `model` (its image shape counts)."""
    names, _ = metric_set(registry, config.metrics, model_spec, model)
    metrics = tuple((n, registry.version_of("metrics", registry.canonical("metrics", n))) for n in names)
    options = tuple(sorted((k, str(v)) for k, v in config.metric_options.items()))
    methods = [canonical_method(registry, m, model_schedule) for m in config.methods]
    specs = [
        CellSpec(model_spec, method, nfe, config.num_samples, config.seed + r * config.num_samples, metrics,
                 options, device.type, config.dtype, config.channels_last, config.compile,
                 prompts=config.prompts)
        for method in methods
        for nfe in config.nfe
        for r in range(config.repeats)  # disjoint seed blocks, each its own cell
    ]
    unique: dict[str, CellSpec] = {}
    for spec in specs:
        unique.setdefault(spec.id, spec)  # a duplicate (the same cell written twice) runs once
    return list(unique.values())


def _batches(n: int, size: int) -> Iterable[torch.Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


def base_record(registry: Registry, config: RunConfig, spec: CellSpec, device,
                world: World, model: Denoiser | None = None) -> dict[str, Any]:
    """What a record says of its cell before it runs: the spec, flat fields for tables, versions."""
    method = spec.method
    sampler = registry.get("samplers", method.sampler.name)
    return {
        "spec": spec.identity(),
        "model": spec.model,
        "method": method.label(sampler.default_schedule),
        "sampler": str(method.sampler),
        "schedule": str(method.schedule),
        "modifiers": [str(m) for m in method.modifiers],
        "nfe": spec.nfe,
        "num_samples": spec.num_samples,
        "batch_size": config.batch_size,
        "seed": spec.seed,
        "device": str(device),
        **config.speed_options(),
        "world_size": world.size,
        "metric_set": metric_set(registry, config.metrics, spec.model, model)[1],
        "versions": {
            "sampler": registry.version_of("samplers", sampler.name),
            "schedule": registry.version_of("schedules", method.schedule.name),
            "model": registry.version_of("models", spec.model.partition(":")[0]),
            **{f"modifier:{m.name}": registry.version_of("modifiers", m.name) for m in method.modifiers},
        },
    }


def run_cell(
    registry: Registry,
    config: RunConfig,
    spec: CellSpec,
    denoiser: Denoiser,
    cache: dict[Any, Any],
    device: torch.device,
    on_batch: Progress | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """One cell, built and measured; never raises for a sampler's, schedule's or metric's
    failure. In a multi-process run every rank calls it; rank 0's record is the cell's."""
    world = world or World()
    record = base_record(registry, config, spec, device, world, full_precision(denoiser))
    limit = cell_limit(config, world)
    try:
        with time_limit(limit):
            # Build the cell on every rank; a failure on any rank fails the cell on all of them
            solve = world.agree(partial(build, registry, spec, denoiser, device))
            record.update(solve.record())
            return {**record, **_measure(registry, config, spec, solve, denoiser, cache, device, on_batch,
                                         world)}
    except Infeasible as exc:  # the planner's reason, or a modifier that does not apply
        return {**record, "status": "infeasible", "reason": str(exc)}
    except (KeyboardInterrupt, ModelLoadError, DistributedError):
        raise
    except (Exception, SystemExit) as exc:  # plugin code's failure, its sys.exit and a hang included
        return {**record, "status": "failed", "reason": failure_reason(exc),
                **({"cell_timeout": limit} if isinstance(exc, CellTimeout) else {}),
                "traceback": traceback.format_exc(limit=8)}


def failure_reason(exc: BaseException) -> str:
    """A failed cell's reason in one line."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: plugin code called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _measure(registry, config: RunConfig, spec: CellSpec, solve: Solve, denoiser, cache, device,
             on_batch, world: World) -> dict[str, Any]:
    # Metrics live on rank 0, created per cell and fed batch by batch, in batch order
    # They see the model in full precision, guided where the cell is (Modifier.target)
    model = target_model(registry, spec, full_precision(denoiser), cache)
    ctx = MetricContext(spec.model, model, spec.num_samples, spec.seed, device, cache, config.metric_options)
    states: dict[str, Any] = {}
    world.on_main(lambda: states.update({n: registry.get("metrics", n).create(ctx) for n, _ in spec.metrics}))
    floor: dict[str, Any] = {}
    world.on_main(lambda: floor.update(data_floor(registry, spec, ctx, config.batch_size)))
    tally = Tally(grid=config.run_dir() / GRIDS / f"{spec.id}.png",
                  replicates=config.run_dir() / REPLICATES / f"{spec.id}.npz",
                  bootstrap=bootstrap_b(config.metric_options),
                  samples=SampleWriter(config.run_dir() / GRIDS / f"{spec.id}.npz", spec.num_samples)
                  if config.save_samples and world.main else None)
    batches = list(enumerate(_batches(spec.num_samples, config.batch_size)))
    for k, mine in enumerate(world.deal(batches)):
        # Each rank samples its batch of the round (a round is one batch in one process)
        parts = world.collect(partial(_sample, solve, mine, world.size > 1))
        world.on_main(partial(tally.feed, parts, states, device, float(solve.sigmas[0])))
        if on_batch:
            on_batch(spec.id, min(len(batches), (k + 1) * world.size), len(batches))
    # The cell's numbers, on rank 0
    out: dict[str, Any] = {"status": "ok", **({"floor": floor} if floor else {})}
    world.on_main(lambda: out.update(_finish(states, tally, solve.plan, spec.num_samples)))
    return out


def data_floor(registry: Registry, spec: CellSpec, ctx: MetricContext, batch_size: int) -> dict[str, Any]:
    """Each floor metric's value on real data at the cell's sample count, drawn from seed 0:
    the model's `data_samples`, else the metric's own (`Metric.data_samples`), once per
    model, metric and count; {} where neither exists. What a perfect sampler would score at
    this n."""
    model_draw = getattr(ctx.denoiser, "data_samples", None)
    out: dict[str, Any] = {}
    drawn: dict[Any, torch.Tensor] = {}  # the real samples of each source, drawn once for every metric
    for name, _ in spec.metrics:
        metric = registry.get("metrics", name)
        draw = model_draw or metric.data_samples
        key = ("floor", name, spec.num_samples)
        if metric.floor and draw is not None and key not in ctx.cache:
            state = metric.create(ctx)
            if draw not in drawn:
                drawn[draw] = draw(spec.num_samples, 0).to(ctx.device)
            x = drawn[draw]
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size]
                idx = torch.arange(start, start + len(xb))
                state.update(Batch(x0=xb, eps=torch.zeros_like(xb), indices=idx,
                                   sigma_max=float(ctx.denoiser.sigma_max), seeds=idx))
            ctx.cache[key] = {k: v.to_json() for k, v in state.result().items()}
        out.update(ctx.cache.get(key, {}))
    return out


def _sample(solve: Solve, batch, portable: bool) -> Sampled | None:
    """One batch from its per-sample noise; non-finite samples fail the cell."""
    if batch is None:
        return None  # this rank has no batch in the last round
    b, indices = batch
    s = solve.sample(indices)
    bad = int((~torch.isfinite(s.x0.reshape(len(s.x0), -1))).any(1).sum())
    if bad:
        raise FloatingPointError(f"non-finite samples (NaN/inf): {bad} of {len(s.x0)} in batch {b}")
    s.x0 = s.x0.float()
    if portable:  # sent to rank 0 through the CPU
        s.x0, s.eps = s.x0.cpu(), s.eps.cpu()
    return s


@dataclass
class Tally:
    """Rank 0's running totals over a cell's batches."""

    wall: float = 0.0
    model_s: float = 0.0
    decode_s: float = 0.0
    metric_s: float = 0.0
    extra: int = 0
    extra_cost: float = 0.0
    nfe: set[int] = field(default_factory=set)
    grid: Path | None = None  # where the first batch's PNG grid goes, once it is saved
    replicates: Path | None = None  # where the metrics' paired bootstrap replicates go
    bootstrap: int = 0  # B, the bootstrap's replicate count (the run's metric option `bootstrap`)
    samples: SampleWriter | None = None  # --save-samples: the cell's images, streamed in sample order

    def feed(self, parts: list[Sampled | None], states: dict[str, Any], device, sigma_max: float) -> None:
        """Add a round's batches, in batch order, and feed them to the metrics."""
        for s in filter(None, parts):
            self.wall += s.wall
            self.model_s += s.model_s
            self.decode_s += s.decode_s
            self.nfe.add(s.nfe)
            self.extra, self.extra_cost = max(self.extra, s.extra), max(self.extra_cost, s.extra_cost)
            start = time.perf_counter()
            batch = Batch(x0=s.x0.to(device), eps=s.eps.to(device), indices=s.indices, sigma_max=sigma_max,
                          seeds=s.seeds)
            for state in states.values():
                state.update(batch)
            self.metric_s += time.perf_counter() - start
            # The first samples as a PNG grid beside the results
            if self.grid is not None and int(s.indices[0]) == 0:
                save_grid(s.x0, self.grid)
            if self.samples is not None:
                self.samples.write(s.indices, s.x0)


def _finish(states, tally: Tally, plan, n: int) -> dict[str, Any]:
    """The cell's record fields once every batch is in: metrics, counted NFE, times."""
    metrics = {}
    for name, state in states.items():
        for key, value in state.result().items():
            if not math.isfinite(value.value):
                raise FloatingPointError(f"metric '{name}' returned {value.value} for '{key}'")
            metrics[key] = value.to_json()
    if len(tally.nfe) != 1:
        raise PluginError(f"sampler spent different NFE on different batches: {sorted(tally.nfe)}")
    saved = save_replicates(states, tally, n)
    exported = tally.samples.close() if tally.samples is not None else None
    info = {name: st.info() for name, st in states.items() if callable(getattr(st, "info", None))}
    counted_nfe = next(iter(tally.nfe))
    out = {
        "nfe_counted": counted_nfe,
        "nfe_extra": tally.extra,
        "nfe_equiv": counted_nfe + tally.extra_cost,
        "wall_s": tally.wall,
        "model_s": tally.model_s,
        "overhead_s": tally.wall - tally.model_s,
        "metric_s": tally.metric_s,
        **({"decode_s": tally.decode_s} if tally.decode_s else {}),
        "metrics": metrics,
        **({"grid": f"{GRIDS}/{tally.grid.name}"} if tally.grid and tally.grid.is_file() else {}),
        **({"replicates": f"{REPLICATES}/{saved.name}"} if saved else {}),
        **({"samples": f"{GRIDS}/{exported.name}"} if exported else {}),
        **({"metric_info": info} if any(info.values()) else {}),
    }
    if counted_nfe != plan.nfe:
        out["reason"] = f"planner promised {plan.nfe} NFE, sampler spent {counted_nfe}"
    return out


def save_replicates(states: dict[str, Any], tally: Tally, n: int) -> Path | None:
    """Every metric's bootstrap replicates on the shared index sets (bench.stats.index_sets:
    the same rows for every cell of n samples, so two cells' replicates are paired), written
    atomically to the run directory; None when no metric has replicates."""
    with_reps = [st for st in states.values() if callable(getattr(st, "replicates", None))]
    if not with_reps or tally.replicates is None or tally.bootstrap < 2 or n < 2:
        return None
    rows = index_sets(n, tally.bootstrap)  # the rows result() took its std from: computed once
    arrays = {k: np.asarray(v, dtype=np.float64) for st in with_reps for k, v in st.replicates(rows).items()}
    tally.replicates.parent.mkdir(parents=True, exist_ok=True)
    npz = io.BytesIO()
    np.savez(npz, **arrays)
    return atomic_write(tally.replicates, npz.getvalue())


# --- What the fit stages will cost, before the run ---------------------------------------


def fit_notices(registry: Registry, specs: list[CellSpec], model: Denoiser, device) -> dict[str, list[str]]:
    """{cell id: lines} for the cells whose fit stage (a searched schedule's search, a
    sampler's prepare) is not cached, with its estimated network calls and seconds (from
    forward passes of `model` timed at the fit's batch sizes); {} without timing anything
    when no cell has one."""

    def staged(spec: CellSpec) -> bool:
        sampler = registry.get("samplers", spec.method.sampler.name)
        sched = registry.get("schedules", (spec.method.schedule or Spec.parse(sampler.default_schedule)).name)
        return sched.estimate is not None or sampler.estimate is not None

    call_s = functools.cache(functools.partial(_forward_s, model, device))
    notices: dict[str, list[str]] = {}
    for spec in filter(staged, specs):
        try:
            lines = _estimates(registry, spec, model, device, call_s)
        except Exception:  # noqa: S112 -- the cell itself reports what is wrong
            continue
        if lines:
            notices[spec.id] = lines
    return notices


def _forward_s(model: Denoiser, device, batch: int) -> float:
    return calibrate(model, batch, device, repeats=3)


def _estimates(registry, spec: CellSpec, model: Denoiser, device, call_s) -> list[str]:
    sampler = registry.get("samplers", spec.method.sampler.name)
    options = resolve_options("sampler", sampler.name, sampler.options, dict(spec.method.sampler.options))
    plan = plan_cell(sampler, spec.nfe, options)
    options = {**options, **plan.options}
    sched_spec = spec.method.schedule or Spec.parse(sampler.default_schedule)
    schedule = registry.get("schedules", sched_spec.name)
    sched_options = resolve_options("schedule", schedule.name, schedule.options, dict(sched_spec.options))
    where, out, sigmas = f"{spec.method.label(sampler.default_schedule)} @ NFE {spec.nfe}", [], None
    if schedule.fit is not None and plan.sigmas is None:
        cell = {"model": spec.model, "sampler": sampler.name, "sampler_options": options, "nfe": spec.nfe}
        args = (plan.steps, model.sigma_min, model.sigma_max)
        est = schedule.estimate(*args, to_zero=plan.to_zero, denoiser=model, device=device, cell=cell,
                                call_s=call_s, **sched_options) if schedule.estimate else None
        if est:
            out.append(f"{where}: schedule {sched_spec} searches first, about {est['calls']} network calls, "
                       f"{est['seconds']:.0f} s (not cached)")
        else:  # found: its sigmas, for the sampler's own estimate
            sigmas = schedule.fit(*args, to_zero=plan.to_zero, denoiser=model, device=device, cell=cell,
                                  **sched_options)[0]
    else:
        sigmas = make_sigmas(schedule, sched_options, plan, model, device)
    if sampler.estimate is not None and sigmas is not None:
        est = sampler.estimate(model, sigmas, options, call_s)
        if est:
            out.append(f"{where}: {sampler.name} fits first, about {est['calls']} network calls, "
                       f"{est['seconds']:.0f} s (not cached)")
    return out
