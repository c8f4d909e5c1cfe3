"""The runner: a grid of cells (model x method x NFE budget), each run, measured and stored.

A method is a sampler with its options, a schedule and a chain of modifiers. Every cell
draws the same per-sample noise, spends exactly its budget (the counter enforces the most;
a cell that spends less than its plan promised fails), and ends as one record: ok,
infeasible (with the planner's reason) or failed (with the error); a failing cell never
stops the run. The configuration is bench.config's, the checks before the first cell
bench.checks', the time limit bench.timelimit's, and every file goes through the run
directory (bench.Run).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .cell import CellSpec, Sampled, Solve, build, canonical_method, load_model, resolve_device, target_model
from .checks import Calibration, check_cell, check_same_sweep, check_time, fit_notices, validate
from .config import RunConfig
from .contracts import Batch, Denoiser, MetricContext
from .distributed import DistributedError, World
from .errors import BenchError, Infeasible, ModelLoadError, PluginError
from .images import SampleWriter, save_grid
from .metrics import check_applies, metric_set
from .plugins import Registry
from .records import FINAL
from .rundir import Run
from .stats import bootstrap_b, index_sets
from .throughput import accelerate, full_precision
from .timelimit import CellTimeout, cell_limit, time_limit

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
    out = Run(config.run_dir())
    if not world.main:
        return _run(registry, config, world, out, on_cell, on_batch, on_start, on_notice)
    with out.writing(), interrupts():  # one writer per run directory
        try:
            return _run(registry, config, world, out, on_cell, on_batch, on_start, on_notice)
        except BenchError:  # refused before any cell stored: no config.json claims the directory
            if not out.results_path.exists():
                out.config_path.unlink(missing_ok=True)
            raise


def _run(registry: Registry, config: RunConfig, world: World, out: Run, on_cell, on_batch,
         on_start=None, on_notice=None) -> tuple[Path, list[dict[str, Any]]]:
    device = resolve_device(world.device(config.device))
    if device.type == "cpu":  # one thread by default: OpenMP spin-waits thrash on a shared CPU
        torch.set_num_threads(config.threads)
    env = {**environment(device, registry), "world_size": world.size, "threads": torch.get_num_threads()}
    done: dict[str, dict[str, Any]] = {}
    if world.main:
        check_same_sweep(out.dir, config)
        out.write_config({**config.identity(), "command": config.command, "batch_size": config.batch_size,
                          "shard": list(config.shard), "environment": env,
                          "cell_timeout": config.cell_timeout,
                          "cell_timeout_enforced": cell_limit(config.cell_timeout, world.size) is not None,
                          **config.extra})
        done = {r["cell_id"]: r for r in out.records if r.get("status") in FINAL}
    finished = world.broadcast(set(done))  # every rank skips the same cells
    new: list[dict[str, Any]] = []
    first = 0  # the grid index of the model's first cell: shards share out the whole grid
    for model_spec in config.models:
        # Rank 0 loads first: a download lands in the shared cache once
        plain = world.main_first(partial(load_model, model_spec, device, registry, config.model_options))
        denoiser = accelerate(plain, **config.speed_options())
        calibration = Calibration(denoiser, device)
        calibration_s = calibration(min(config.batch_size, config.num_samples))
        cache: dict[Any, Any] = {}
        # The model's parameterization, in config.json and every record
        model_info = json.loads(json.dumps(plain.describe(), default=str))
        if world.main:
            out.update_config(model_info={**out.config.get("model_info", {}), model_spec: model_info})
        specs = cell_specs(registry, config, model_spec, device, plain.default_schedule, plain)
        ours = [(first + k, spec) for k, spec in enumerate(specs)
                if (first + k) % config.shard[1] == config.shard[0]]
        first += len(specs)
        # Before the model's first cell: every cell's sigmas, and its time within the limit
        todo = [spec for _, spec in ours if spec.id not in finished]
        check_time(config, todo, calibration_s, world.size)
        for spec in todo:
            check_cell(registry, spec, denoiser, device)
        # Before the model's first cell: every metric of its cells can score it
        check_applies(registry, metric_set(registry, config.metrics, model_spec, plain)[0], model_spec, plain,
                      {"num_samples": config.num_samples, "seed": config.seed, "device": device,
                       "cache": cache, "options": config.metric_options})
        # Before the model's first cell: what its uncached fit stages will cost, said once
        notices = fit_notices(registry, todo, denoiser, device, calibration) \
            if on_notice and world.main else {}
        if notices:
            on_notice(notices)
        stamp = partial(stamp_record, config=config, env=env, calibration_s=calibration_s,
                        model_info=model_info)
        if config.race:  # each budget a race of its methods (bench.race)
            for nfe in config.nfe:
                cells = [(index, spec) for index, spec in ours if spec.nfe == nfe]
                new += race_budget(registry, config, world, out, cells, denoiser, cache, device, finished,
                                   done, stamp, on_cell, on_batch, on_start)
            continue
        for index, spec in ours:
            if spec.id in finished:
                if on_cell and world.main:
                    on_cell(spec, done[spec.id])
                continue
            if on_start and world.main:
                on_start(spec, notices.get(spec.id))
            record = run_cell(registry, config, spec, denoiser, cache, device,
                              on_batch if world.main else None, world, out)
            if not world.main:
                continue
            record = store(out, stamp(record, index, spec))
            new.append(record)
            if on_cell:
                on_cell(spec, record)
    return out.dir, new


# --- Racing (bench.race) ----------------------------------------------------------------


def race_budget(registry: Registry, config: RunConfig, world: World, out: Run,
                cells: list[tuple[int, CellSpec]], denoiser, cache, device, finished: set[str],
                done: dict[str, dict[str, Any]], stamp: Callable[..., dict[str, Any]], on_cell, on_batch,
                on_start) -> list[dict[str, Any]]:
    """One budget's race (`--race`): every method's cell grown round by round on the same
    seeds, the worse ones leaving after each round's paired verdict. Each round's records are
    stored as its cells finish (`race`: round, planned rounds, n, level) and, once the round
    is decided, stored again with their `outcome`; a rerun reads the stored rounds, replays
    their decisions and goes on (`finished`: the cell ids stored, on every rank; `done`: their
    records, on rank 0). `stamp(record, index, spec)` adds the run's fields."""
    from .race import Race, round_sizes

    sizes = round_sizes(config.num_samples, config.max_samples or config.num_samples)
    race = Race([spec.id for _, spec in cells], sizes)
    by_id = {spec.id: (index, spec) for index, spec in cells}
    sessions: dict[str, tuple[Solve, Measurement] | None] = {}
    new: list[dict[str, Any]] = []
    start = time.perf_counter()
    while not race.done:
        n, records = race.n, {}
        for key in list(race.alive):
            index, first = by_id[key]
            spec = replace(first, num_samples=n)
            record = done.get(spec.id)
            if spec.id not in finished:
                if on_start and world.main:
                    on_start(spec, None)
                record = race_cell(registry, config, world, out, first, spec, sessions, denoiser, cache,
                                   device, on_batch if world.main else None)
                if world.main:
                    record = store(out, stamp({**record, "race": race_fields(race, n)}, index, spec))
                    new.append(record)
            if world.main and on_cell:
                on_cell(spec, record)
            records[key] = record
        # The round's verdict, on rank 0; every rank goes on with the same survivors
        final = bool(config.race_time) and time.perf_counter() - start > config.race_time
        entry = world.broadcast(decide(race, records, out, final) if world.main else None)
        race.apply(entry)
        if world.main:
            new += settle(out, records, entry)
    return new


def race_fields(race, n: int) -> dict[str, Any]:
    return {"round": race.round + 1, "rounds": race.planned, "n": n, "level": race.round_level}


def race_cell(registry, config: RunConfig, world: World, out: Run, first: CellSpec, spec: CellSpec,
              sessions: dict, denoiser, cache, device, on_batch) -> dict[str, Any]:
    """A method's cell grown to spec.num_samples: built once (at its first round), its earlier
    samples kept by its metric states; a session lost to a rerun is rebuilt by sampling the
    earlier seeds again."""
    record = base_record(registry, config, spec, device, world, full_precision(denoiser))

    def body() -> dict[str, Any]:
        if sessions.get(first.id) is None:
            solve = world.agree(partial(build, registry, first, denoiser, device))
            sessions[first.id] = (solve, Measurement(registry, config, first, solve, denoiser, cache, device,
                                                     world, out, on_batch))
        solve, measurement = sessions[first.id]
        record.update(solve.record())
        measurement.on_batch = on_batch
        measurement.grow(spec.num_samples)
        return measurement.result(spec)

    result = attempt(record, body, cell_limit(config.cell_timeout, world.size))
    if result.get("status") != "ok":
        sessions[first.id] = None
    return result


def decide(race, records: dict[str, dict[str, Any]], out: Run, final: bool = False) -> dict[str, Any]:
    """The round's verdict on its records' race metric (the first value of the first metric),
    from their stored replicates; methods whose cell failed or has no replicates leave."""
    ok = {k: r for k, r in records.items() if r.get("status") == "ok" and r.get("metrics")}
    metric = next(iter(next(iter(ok.values()))["metrics"]), None) if ok else None
    point, reps, higher = {}, {}, False
    for key, r in ok.items():
        value, stored = r["metrics"].get(metric), out.replicates(r) or {}
        if value is not None and metric in stored:
            point[key], reps[key] = value["value"], stored[metric]
            higher = bool(value.get("higher_is_better"))
    return {**race.decide(point, reps, higher, final=final), "metric": metric}


def settle(out: Run, records: dict[str, dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Each record of the decided round stored again with its outcome (the latest record of a
    cell is the one read), unless it has it already (a replayed round)."""
    again = []
    for key, record in records.items():
        outcome = entry["outcome"].get(key, "left")
        if (record.get("race") or {}).get("outcome") != outcome and "race" in record:
            again.append(store(out, {**record, "race": {**record["race"], "outcome": outcome,
                                                        "metric": entry.get("metric")}}))
    return again


def stamp_record(record: dict[str, Any], index: int, spec: CellSpec, *, config: RunConfig,
                 env: dict[str, Any], calibration_s: float, model_info: dict[str, Any]) -> dict[str, Any]:
    """What every stored record says besides its cell's own fields."""
    return {**record, "cell_id": spec.id, "cell_index": index, "environment": env,
            "calibration_s": calibration_s, "repeat": (spec.seed - config.seed) // config.num_samples,
            "model_info": model_info}


def store(out: Run, record: dict[str, Any]) -> dict[str, Any]:
    """Append the cell's record; one that cannot be written (a full disk) comes back failed and
    `stored: False`, the file cut back to its last good line: a rerun runs the cell again."""
    try:
        out.append(record)
    except OSError as exc:
        return {**record, "status": "failed", "stored": False,
                "reason": f"its record could not be written: {type(exc).__name__}: {exc}"}
    return record


# --- Ctrl-C, told apart from a plugin's KeyboardInterrupt ----------------------------------

_interrupted = threading.Event()


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """While a run runs (in the main thread), remember that SIGINT arrived before raising
    KeyboardInterrupt as Python does: a KeyboardInterrupt without it is plugin code's own
    raise, which fails its cell instead of ending the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        _interrupted.set()
        raise KeyboardInterrupt

    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cell_specs(registry: Registry, config: RunConfig, model_spec: str, device: torch.device,
               model_schedule: str | None = None, model: Denoiser | None = None) -> list[CellSpec]:
    """The model's cells in grid order: methods x budgets, each method in canonical form (a
    method that names no schedule gets the model's preferred one, `model_schedule`, if any).
    Their metrics are `metric_set`'s for the loaded `model` (its image shape counts)."""
    names, _ = metric_set(registry, config.metrics, model_spec, model)
    canonical = [registry.canonical("metrics", n) for n in names]  # an alias (rmse) under its name
    metrics = tuple((n, registry.version_of("metrics", n)) for n in dict.fromkeys(canonical))
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


def _batches(first: int, stop: int, size: int) -> Iterable[torch.Tensor]:
    """Sample positions first .. stop - 1 in batches of `size`."""
    for start in range(first, stop, size):
        yield torch.arange(start, min(stop, start + size))


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
    out: Run | None = None,
) -> dict[str, Any]:
    """One cell, built and measured; never raises for a sampler's, schedule's or metric's
    failure. In a multi-process run every rank calls it; rank 0's record is the cell's."""
    world = world or World()
    out = out or Run(config.run_dir())
    record = base_record(registry, config, spec, device, world, full_precision(denoiser))

    def body() -> dict[str, Any]:
        # Build the cell on every rank; a failure on any rank fails the cell on all of them
        solve = world.agree(partial(build, registry, spec, denoiser, device))
        record.update(solve.record())
        return _measure(registry, config, spec, solve, denoiser, cache, device, on_batch, world, out)

    return attempt(record, body, cell_limit(config.cell_timeout, world.size))


def attempt(record: dict[str, Any], body: Callable[[], dict[str, Any]],
            limit: float | None) -> dict[str, Any]:
    """The record with what `body` measures, within the time limit; a sampler's, schedule's or
    metric's failure makes it failed (or infeasible) instead of raising. Ctrl-C, a model that
    cannot load and a lost process still end the run."""
    try:
        with time_limit(limit):
            measured = body()  # it may add to `record` (the plan's fields) before it measures
            return {**record, **measured}
    except Infeasible as exc:  # the planner's reason, or a modifier that does not apply
        return {**record, "status": "infeasible", "reason": str(exc)}
    except KeyboardInterrupt as exc:  # Ctrl-C ends the run; plugin code's own raise fails its cell
        if _interrupted.is_set() or threading.current_thread() is not threading.main_thread():
            raise
        return _failed(record, exc, limit)
    except (ModelLoadError, DistributedError):
        raise
    except (Exception, SystemExit) as exc:  # plugin code's failure, its sys.exit and a hang included
        return _failed(record, exc, limit)


def _failed(record: dict[str, Any], exc: BaseException, limit: float | None) -> dict[str, Any]:
    return {**record, "status": "failed", "reason": failure_reason(exc),
            **({"cell_timeout": limit} if isinstance(exc, CellTimeout) else {}),
            "traceback": traceback.format_exc(limit=8)}


def failure_reason(exc: BaseException) -> str:
    """A failed cell's reason in one line."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: plugin code called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt raised by plugin code (not Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


def _measure(registry, config: RunConfig, spec: CellSpec, solve: Solve, denoiser, cache, device,
             on_batch, world: World, out: Run) -> dict[str, Any]:
    measurement = Measurement(registry, config, spec, solve, denoiser, cache, device, world, out, on_batch)
    measurement.grow(spec.num_samples)
    return measurement.result(spec)


class Measurement:
    """A built cell sampled and scored. Its metrics live on rank 0, created once and fed batch
    by batch in sample order; they see the model in full precision, guided where the cell is
    (Modifier.target). `grow(n)` samples the positions up to n (a race grows a cell round by
    round, never drawing a sample twice); `result(spec)` gives the record's fields at that n."""

    def __init__(self, registry, config: RunConfig, spec: CellSpec, solve: Solve, denoiser, cache, device,
                 world: World, out: Run, on_batch: Progress | None = None) -> None:
        self.registry, self.config, self.solve, self.device = registry, config, solve, device
        self.world, self.out, self.on_batch, self.n = world, out, on_batch, 0
        model = target_model(registry, spec, full_precision(denoiser), cache)
        self.ctx = MetricContext(spec.model, model, spec.num_samples, spec.seed, device, cache,
                                 config.metric_options)
        # A metric defined for deterministic cells only (a distance to the model's own ODE
        # solution) is not applicable to a stochastic one: recorded as such, never ranked
        metrics = {n: registry.get("metrics", n) for n, _ in spec.metrics}
        self.not_applicable = {n: "not applicable: the sampler draws fresh noise (a stochastic cell)"
                               for n, m in metrics.items() if m.deterministic_only and solve.stochastic}
        self.answers = {n: m.answers for n, m in metrics.items() if m.answers}
        self.states: dict[str, Any] = {}
        world.on_main(lambda: self.states.update({n: m.create(self.ctx) for n, m in metrics.items()
                                                  if n not in self.not_applicable}))
        self.tally = Tally(grid=out.grid_path(spec.id), bootstrap=bootstrap_b(config.metric_options),
                           samples=SampleWriter(out.samples_path(spec.id), spec.num_samples)
                           if config.save_samples and world.main else None)

    def grow(self, n: int) -> None:
        """Sample positions self.n .. n - 1 and feed them to the metrics."""
        batches = list(enumerate(_batches(self.n, n, self.config.batch_size)))
        for k, mine in enumerate(self.world.deal(batches)):
            # Each rank samples its batch of the round (a round is one batch in one process)
            parts = self.world.collect(partial(_sample, self.solve, mine, self.world.size > 1))
            self.world.on_main(partial(self.tally.feed, parts, self.states, self.device,
                                       float(self.solve.sigmas[0])))
            if self.on_batch:
                self.on_batch(self.solve.spec.id, min(len(batches), (k + 1) * self.world.size), len(batches))
        self.n = n

    def result(self, spec: CellSpec) -> dict[str, Any]:
        """The cell's numbers at its current n (spec.num_samples), on rank 0."""
        floor: dict[str, Any] = {}
        self.world.on_main(lambda: floor.update(data_floor(self.registry, spec, self.ctx,
                                                           self.config.batch_size)))
        out: dict[str, Any] = {"status": "ok", **({"floor": floor} if floor else {}),
                               **({"not_applicable": self.not_applicable} if self.not_applicable else {})}
        self.world.on_main(lambda: out.update(_finish(self.states, self.tally, self.solve.plan, spec,
                                                      self.out, self.answers)))
        return out


def data_floor(registry: Registry, spec: CellSpec, ctx: MetricContext, batch_size: int) -> dict[str, Any]:
    """Each floor metric's value on real data at the cell's sample count, drawn from seed 0:
    the model's `data_samples`, else the metric's own (`Metric.data_samples`), once per
    model, metric and count; {} where neither exists. What a perfect sampler would score at
    this n."""
    model_draw = ctx.denoiser.data_samples
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


def _finish(states, tally: Tally, plan, spec: CellSpec, out: Run,
            answers: dict[str, str] | None = None) -> dict[str, Any]:
    """The cell's record fields once every batch is in: metrics (each with the question its
    metric answers, where it says), counted NFE, times. A cell that spent other than its
    plan's NFE fails: it never ranks beside cells that paid in full."""
    metrics, answers = {}, answers or {}
    for name, state in states.items():
        for i, (key, value) in enumerate(state.result().items()):
            if not math.isfinite(value.value):
                raise FloatingPointError(f"metric '{name}' returned {value.value} for '{key}'")
            # which metric gave it, whether it is that metric's headline value, what it answers
            metrics[key] = {**value.to_json(), "metric": name, **({"headline": True} if i == 0 else {}),
                            **({"answers": answers[name]} if answers.get(name) else {})}
    if len(tally.nfe) != 1:
        raise PluginError(f"sampler spent different NFE on different batches: {sorted(tally.nfe)}")
    counted_nfe = next(iter(tally.nfe))
    if counted_nfe != plan.nfe:
        raise PluginError(f"planner promised {plan.nfe} NFE, sampler spent {counted_nfe}")
    saved = save_replicates(states, tally, spec, out)
    exported = tally.samples.close() if tally.samples is not None else None
    info = {name: st.info() for name, st in states.items() if callable(getattr(st, "info", None))}
    return {
        "nfe_counted": counted_nfe,
        "nfe_extra": tally.extra,
        "nfe_equiv": counted_nfe + tally.extra_cost,
        "wall_s": tally.wall,
        "model_s": tally.model_s,
        "overhead_s": tally.wall - tally.model_s,
        "metric_s": tally.metric_s,
        **({"decode_s": tally.decode_s} if tally.decode_s else {}),
        "metrics": metrics,
        **({"grid": out.relative(tally.grid)} if tally.grid and tally.grid.is_file() else {}),
        **({"replicates": saved} if saved else {}),
        **({"samples": out.relative(exported)} if exported else {}),
        **({"metric_info": info} if any(info.values()) else {}),
    }


def save_replicates(states: dict[str, Any], tally: Tally, spec: CellSpec, out: Run) -> str | None:
    """Every metric's bootstrap replicates on the shared index sets (bench.stats.index_sets:
    the same rows for every cell of n samples, so two cells' replicates are paired), written
    to the run directory; None when no metric has replicates."""
    with_reps = [st for st in states.values() if callable(getattr(st, "replicates", None))]
    n = spec.num_samples
    if not with_reps or tally.bootstrap < 2 or n < 2:
        return None
    rows = index_sets(n, tally.bootstrap)  # the rows result() took its std from: computed once
    return out.write_replicates(spec.id, {k: v for st in with_reps for k, v in st.replicates(rows).items()})
