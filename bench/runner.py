"""The runner: a grid of cells (model x method x NFE budget), each run, measured and stored.

A method is a sampler with its options, a schedule and a chain of modifiers. Every cell
draws the same per-sample noise, spends at most its budget (the counter enforces it),
and ends as one record: ok, infeasible (with the planner's reason) or failed (with the
error); a failing cell never stops the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .contracts import Batch, Denoiser, MetricContext, check_denoiser, resolve_options
from .distributed import DistributedError, World
from .errors import Infeasible, ModelLoadError, PluginError, UsageError
from .images import save_grid
from .nfe import CountingDenoiser, synchronize
from .plugins import Registry
from .seeding import SampleNoise
from .store import CONFIG, FINAL, RESULTS, append_record, read_records, write_json
from .throughput import DTYPES, accelerate, full_precision

GRIDS = "samples"  # run subdirectory of each cell's PNG grid of its first samples

# --- Specs: "name:key=value:key=value" --------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A plugin name with options, written `name:key=value:key=value` on the command line."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Spec:
        name, *pairs = text.strip().split(":")
        options = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"option '{pair}' of '{text}' is not key=value")
            options.append((key.strip(), value.strip()))
        if not name:
            raise UsageError(f"'{text}' names nothing; write name or name:key=value")
        return cls(name.strip(), tuple(options))

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options)])


@dataclass(frozen=True)
class Method:
    """sampler + schedule + modifiers; `schedule=None` means the sampler's default."""

    sampler: Spec
    schedule: Spec | None = None
    modifiers: tuple[Spec, ...] = ()

    def label(self, default_schedule: str) -> str:
        """`heun`, `euler:churn=10 @time-uniform +skip-tuning`: the schedule only if not default."""
        text = str(self.sampler)
        if self.schedule is not None and str(self.schedule) != default_schedule:
            text += f" @{self.schedule}"
        return text + "".join(f" +{m}" for m in self.modifiers)


@dataclass
class RunConfig:
    """Everything that defines a run; what identifies a cell is hashed into its id."""

    models: list[str]
    methods: list[Method]
    nfe: list[int]
    num_samples: int = 1000
    batch_size: int = 500
    seed: int = 0
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

    def identity(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "methods": [
                [str(m.sampler), str(m.schedule), [str(x) for x in m.modifiers]]
                for m in self.methods
            ],
            "nfe": self.nfe,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metrics": self.metrics,
            "device": torch.device(self.device).type,
            **({"metric_options": self.metric_options} if self.metric_options else {}),
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


SPEED_DEFAULTS = {"dtype": "fp32", "channels_last": False, "compile": False}


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def parse_nfe(text: str) -> list[int]:
    """`5,10,20` -> [5, 10, 20]; anything else is a UsageError."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UsageError(
                f"--nfe: '{part}' is not a positive integer; give a comma list such as 5,10,20"
            )
        values.append(int(part))
    return list(dict.fromkeys(values))


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


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: '{name}' is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


# --- Loading and validating ------------------------------------------------------------


def load_model(registry: Registry, spec: str, device: torch.device,
               options: dict[str, Any] | None = None) -> Denoiser:
    """A model spec `name[:arg][;key=value]` through its registered ModelSource; run-wide
    `options` (e.g. trust_pickle) reach the sources that declare them."""
    name, _, arg = spec.partition(":")
    source = registry.get("models", name)
    given = {k: v for k, v in (options or {}).items() if k in source.options}
    try:
        denoiser = source.load(arg or None, device=device, **given)
    except (UsageError, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"model '{spec}' failed to load: {type(exc).__name__}: {exc}") from exc
    check_denoiser(denoiser)
    denoiser.spec = spec
    denoiser = denoiser.to(device).eval()
    # One untimed call, so the first cell does not pay for lazy initialisation
    with torch.inference_mode():
        denoiser(torch.zeros(1, *denoiser.shape, device=device), denoiser.sigma_max)
    return denoiser


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
    for method in config.methods:
        sampler = registry.get("samplers", method.sampler.name)
        resolve_options("sampler", sampler.name, sampler.options, dict(method.sampler.options))
        schedule = registry.get("schedules", (method.schedule or Spec.parse(sampler.default_schedule)).name)
        if method.schedule is not None:
            resolve_options("schedule", schedule.name, schedule.options, dict(method.schedule.options))
        for mod in method.modifiers:
            modifier = registry.get("modifiers", mod.name)
            resolve_options("modifier", modifier.name, modifier.options, dict(mod.options))


# --- Running --------------------------------------------------------------------------


@dataclass
class Cell:
    model: str
    method: Method
    nfe: int
    id: str


Progress = Callable[[str, int, int], None]


def run(
    registry: Registry,
    config: RunConfig,
    on_cell: Callable[[Cell, dict[str, Any] | None], None] | None = None,
    on_batch: Progress | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Run every cell not already finished in the run directory; return (dir, new records).

    Under torchrun every process runs this (bench.distributed): the cells' batches are
    shared out, rank 0 alone writes and returns the records, the other ranks return none.
    With `config.shard = (i, n)` only the cells whose grid index is i mod n run.
    """
    validate(registry, config)
    world = World.from_env()
    device = resolve_device(world.device(config.device))
    out = config.run_dir()
    env = {**environment(device, registry), "world_size": world.size}
    done: dict[str, dict[str, Any]] = {}
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, {**config.identity(), "command": config.command, "batch_size":
                                  config.batch_size, "shard": list(config.shard), "environment": env,
                                  **config.extra})
        done = {r["cell_id"]: r for r in read_records(out / RESULTS) if r.get("status") in FINAL}
    finished = world.broadcast(set(done))  # every rank skips the same cells
    new: list[dict[str, Any]] = []
    index = -1  # the cell's place in the whole grid, which shards share out
    for model_spec in config.models:
        # Rank 0 loads first: a download lands in the shared cache once
        plain = world.main_first(partial(load_model, registry, model_spec, device, config.model_options))
        denoiser = accelerate(plain, **config.speed_options())
        calibration_s = calibrate(denoiser, min(config.batch_size, config.num_samples), device)
        source = registry.get("models", model_spec.partition(":")[0])
        metric_names = config.metrics if config.metrics is not None else list(source.default_metrics)
        cache: dict[Any, Any] = {}
        for method in config.methods:
            for nfe in config.nfe:
                index += 1
                if index % config.shard[1] != config.shard[0]:
                    continue
                ident = {**config.identity(), "model": model_spec, "nfe": nfe,
                         "method": [str(method.sampler), str(method.schedule),
                                    [str(m) for m in method.modifiers]],
                         "metrics": metric_names}
                for key in ("models", "methods"):
                    ident.pop(key)
                cell = Cell(model_spec, method, nfe, digest(ident)[:16])
                if cell.id in finished:
                    if on_cell and world.main:
                        on_cell(cell, done[cell.id])
                    continue
                record = run_cell(registry, config, cell, denoiser, metric_names, cache, device,
                                  on_batch if world.main else None, world)
                if not world.main:
                    continue
                record.update(cell_id=cell.id, cell_index=index, environment=env,
                              calibration_s=calibration_s)
                append_record(out / RESULTS, record)
                new.append(record)
                if on_cell:
                    on_cell(cell, record)
    return out, new


def _batches(n: int, size: int) -> Iterable[torch.Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


def run_cell(
    registry: Registry,
    config: RunConfig,
    cell: Cell,
    denoiser: Denoiser,
    metric_names: list[str],
    cache: dict[Any, Any],
    device: torch.device,
    on_batch: Progress | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """One cell, measured; never raises for a sampler's or metric's failure.

    In a multi-process run every rank calls it; rank 0's record is the cell's."""
    world = world or World()
    method = cell.method
    sampler = registry.get("samplers", method.sampler.name)
    sched_spec = method.schedule or Spec.parse(sampler.default_schedule)
    schedule = registry.get("schedules", sched_spec.name)
    record: dict[str, Any] = {
        "model": cell.model,
        "method": method.label(sampler.default_schedule),
        "sampler": str(method.sampler),
        "schedule": str(sched_spec),
        "modifiers": [str(m) for m in method.modifiers],
        "nfe": cell.nfe,
        "num_samples": config.num_samples,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "device": str(device),
        **config.speed_options(),
        "world_size": world.size,
        "versions": {
            "sampler": registry.version_of("samplers", sampler.name),
            "schedule": registry.version_of("schedules", schedule.name),
            "model": registry.version_of("models", cell.model.partition(":")[0]),
            **{f"modifier:{m.name}": registry.version_of("modifiers", m.name) for m in method.modifiers},
        },
    }
    # Plan the budget: the sampler's planner decides steps and options, or says why not
    options = resolve_options("sampler", sampler.name, sampler.options, dict(method.sampler.options))
    try:
        plan = sampler.plan(cell.nfe, options)
    except Infeasible as exc:
        return {**record, "status": "infeasible", "reason": str(exc)}
    record.update(steps=plan.steps, plan_nfe=plan.nfe, options={**options, **plan.options})
    try:
        return {**record, **_measure(registry, config, cell, denoiser, metric_names, cache,
                                     device, sampler, schedule, sched_spec, plan, options, on_batch, world)}
    except Infeasible as exc:  # e.g. a modifier that does not apply to this model
        return {**record, "status": "infeasible", "reason": str(exc)}
    except (KeyboardInterrupt, PluginError, UsageError, ModelLoadError, DistributedError):
        raise
    except Exception as exc:
        return {**record, "status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8)}


def _measure(registry, config, cell, denoiser, metric_names, cache, device, sampler, schedule,
             sched_spec, plan, options, on_batch, world: World) -> dict[str, Any]:
    # Build the method on every rank; a failure on any rank fails the cell on all of them
    counted, model, applied, sigmas, prepared, prep = world.agree(partial(
        _setup, registry, cell, denoiser, device, sampler, schedule, sched_spec, plan, options))
    # Metrics live on rank 0, created per cell and fed batch by batch, in batch order
    ctx = MetricContext(cell.model, full_precision(denoiser), config.num_samples, config.seed, device,
                        cache, config.metric_options)
    states: dict[str, Any] = {}
    world.on_main(lambda: states.update({n: registry.get("metrics", n).create(ctx) for n in metric_names}))
    tally = Tally(grid=config.run_dir() / GRIDS / f"{cell.id}.png")
    sample_options = {**options, **plan.options, **prepared}
    draws = {"ahead": plan.steps if sampler.stochastic else 0}  # noise draws a batch takes, learnt
    batches = list(enumerate(_batches(config.num_samples, config.batch_size)))
    for k, mine in enumerate(world.deal(batches)):
        # Each rank samples its batch of the round (a round is one batch in one process)
        parts = world.collect(partial(_sample, sampler, model, counted, sigmas, mine, config.seed,
                                      device, sample_options, world.size > 1, draws))
        world.on_main(partial(tally.feed, parts, states, device, float(sigmas[0])))
        if on_batch:
            on_batch(cell.id, min(len(batches), (k + 1) * world.size), len(batches))
    # The cell's numbers, on rank 0
    out: dict[str, Any] = {"status": "ok"}
    world.on_main(lambda: out.update(_finish(states, tally, plan, sigmas, prep, applied)))
    return out


def make_sigmas(schedule, options, plan, denoiser, device) -> torch.Tensor:
    """The schedule's sigmas for a plan, checked: plan.steps + 1 of them, decreasing."""
    if plan.sigmas is not None:  # the sampler's own time steps
        sigmas, what = plan.sigmas(denoiser, device), "the sampler's own time steps"
    else:
        sigmas = schedule.sigmas(plan.steps, denoiser.sigma_min, denoiser.sigma_max, to_zero=plan.to_zero,
                                 denoiser=denoiser, device=device, **options)
        what = f"schedule '{schedule.name}'"
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    if len(sigmas) != plan.steps + 1 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise PluginError(f"{what} gave {len(sigmas)} sigmas for {plan.steps} "
                          "steps or they do not decrease")
    return sigmas


def _setup(registry, cell, denoiser, device, sampler, schedule, sched_spec, plan, options):
    """The cell's method: the counter on the model, modifiers on top of the counter, the
    schedule's sigmas and the sampler's own preparation (counted apart from the budget)."""
    # Build the method: counter on the model, modifiers on top of the counter
    counted = CountingDenoiser(denoiser, budget=cell.nfe)
    model: Denoiser = counted
    applied = []
    for mod in cell.method.modifiers:
        modifier = registry.get("modifiers", mod.name)
        params = resolve_options("modifier", mod.name, modifier.options, dict(mod.options))
        if modifier.takes_cell:
            params["cell"] = {"model": cell.model, "sampler": str(cell.method.sampler),
                              "schedule": str(sched_spec), "nfe": cell.nfe}
        model = modifier.apply(model, **params)
        applied.append(getattr(model, "applied", None) or str(mod))
    counted.count_shape = tuple(model.shape)  # the budget counts calls at the sampling resolution
    sched_options = resolve_options("schedule", schedule.name, schedule.options, dict(sched_spec.options))
    sigmas = make_sigmas(schedule, sched_options, plan, denoiser, device)
    # A sampler's own preparation (e.g. fitting a predictor), counted apart from the budget
    prepared: dict[str, Any] = {}
    if sampler.prepare is not None:
        fit = CountingDenoiser(denoiser)
        start = time.perf_counter()
        prepared = dict(sampler.prepare(fit, sigmas, {**options, **plan.options}))
        prep = {"prepare_nfe": fit.nfe, "prepare_s": time.perf_counter() - start,
                # what prepare chose (e.g. which predictor), where it is a plain value
                "prepared": {k: v for k, v in prepared.items() if isinstance(v, (str, int, float, bool))}}
    else:
        prep = {}
    return counted, model, applied, sigmas, prepared, prep


@dataclass
class Sampled:
    """One batch's samples and what sampling them cost: what a rank hands to rank 0."""

    x0: torch.Tensor
    eps: torch.Tensor
    indices: torch.Tensor
    nfe: int
    extra: int
    extra_cost: float
    wall: float
    model_s: float


def _sample(sampler, model, counted, sigmas, batch, seed, device, options, portable,
            draws) -> Sampled | None:
    """One batch from its per-sample noise, timing the whole solve and the model inside it."""
    if batch is None:
        return None  # this rank has no batch in the last round
    b, indices = batch
    noise = SampleNoise(seed, indices, tuple(model.shape), device)
    eps = noise()
    stream = NoiseAhead(noise, draws["ahead"], eps)
    counted.reset()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        x0 = sampler.sample(model, eps * sigmas[0], sigmas, noise=stream, **options)
    synchronize(device)
    wall = time.perf_counter() - start
    draws["ahead"] = stream.draws
    # Reject non-finite samples
    bad = int((~torch.isfinite(x0.reshape(len(x0), -1))).any(1).sum())
    if bad:
        raise FloatingPointError(f"non-finite samples (NaN/inf): {bad} of {len(x0)} in batch {b}")
    x0 = x0.float()
    if portable:  # sent to rank 0 through the CPU
        x0, eps = x0.cpu(), eps.cpu()
    return Sampled(x0, eps, indices, counted.nfe, counted.extra, counted.extra_cost, wall, counted.model_s)


class NoiseAhead:
    """A batch's noise stream with its next `n` draws made before the solve is timed: the
    same numbers, without the per-sample generators' cost (a CPU call per sample per draw)
    in the sampler's wall-clock. Draws past them are made when asked; at most
    AHEAD_BYTES are held."""

    def __init__(self, noise: SampleNoise, n: int, like: torch.Tensor) -> None:
        n = min(n, AHEAD_BYTES // max(1, like.numel() * like.element_size()))
        self.noise, self.ahead, self.draws = noise, deque(noise() for _ in range(n)), 0

    def __call__(self) -> torch.Tensor:
        self.draws += 1
        return self.ahead.popleft() if self.ahead else self.noise()


AHEAD_BYTES = 1 << 30


@dataclass
class Tally:
    """Rank 0's running totals over a cell's batches."""

    wall: float = 0.0
    model_s: float = 0.0
    metric_s: float = 0.0
    extra: int = 0
    extra_cost: float = 0.0
    nfe: set[int] = field(default_factory=set)
    grid: Path | None = None  # where the first batch's PNG grid goes, once it is saved

    def feed(self, parts: list[Sampled | None], states: dict[str, Any], device, sigma_max: float) -> None:
        """Add a round's batches, in batch order, and feed them to the metrics."""
        for s in filter(None, parts):
            self.wall += s.wall
            self.model_s += s.model_s
            self.nfe.add(s.nfe)
            self.extra, self.extra_cost = max(self.extra, s.extra), max(self.extra_cost, s.extra_cost)
            start = time.perf_counter()
            batch = Batch(x0=s.x0.to(device), eps=s.eps.to(device), indices=s.indices, sigma_max=sigma_max)
            for state in states.values():
                state.update(batch)
            self.metric_s += time.perf_counter() - start
            # The first samples as a PNG grid beside the results
            if self.grid is not None and int(s.indices[0]) == 0:
                save_grid(s.x0, self.grid)


def _finish(states, tally: Tally, plan, sigmas, prep, applied) -> dict[str, Any]:
    """The cell's record fields once every batch is in: metrics, counted NFE, times."""
    metrics = {}
    for name, state in states.items():
        for key, value in state.result().items():
            if not math.isfinite(value.value):
                raise FloatingPointError(f"metric '{name}' returned {value.value} for '{key}'")
            metrics[key] = value.to_json()
    if len(tally.nfe) != 1:
        raise PluginError(f"sampler spent different NFE on different batches: {sorted(tally.nfe)}")
    counted_nfe = next(iter(tally.nfe))
    out = {
        "nfe_counted": counted_nfe,
        "nfe_extra": tally.extra,
        "nfe_equiv": counted_nfe + tally.extra_cost,
        **({"modifiers_applied": applied} if applied else {}),
        "wall_s": tally.wall,
        "model_s": tally.model_s,
        "overhead_s": tally.wall - tally.model_s,
        "metric_s": tally.metric_s,
        "metrics": metrics,
        **({"grid": f"{GRIDS}/{tally.grid.name}"} if tally.grid and tally.grid.is_file() else {}),
        "sigmas": [round(float(s), 6) for s in sigmas],
        **prep,
    }
    if counted_nfe != plan.nfe:
        out["reason"] = f"planner promised {plan.nfe} NFE, sampler spent {counted_nfe}"
    return out
