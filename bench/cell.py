"""One cell, built in one place: what identifies it (`CellSpec`) and how it is set up
(`build`), for the runner, the conformance kit, the benchmarks and plugin commands alike.

A cell is a model, a method (sampler with options, schedule, modifiers) and an NFE
budget, sampled from a block of per-sample seeds and scored by named metrics. Its
`CellSpec` is frozen; the hash of its identity is the cell id, stored in each record,
and `bench compare` judges from it alone whether two cells can be compared.

    solve = build(registry, spec, model)    # options -> plan -> sigmas -> counter ->
    out = solve.sample(range(64))            #   modifiers -> prepare, then sample
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .config import DEFAULTS, SPEED_DEFAULTS
from .contracts import Denoiser, Plan, Sampler, Schedule, check_denoiser
from .errors import BenchError, Infeasible, ModelLoadError, PluginError, UsageError
from .nfe import CountingDenoiser, synchronize
from .options import Spec, digest, resolve_options, sorted_spec  # noqa: F401 -- Spec, digest: bench.cell's before
from .seeding import SampleNoise


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


def canonical(registry, kind: str, spec: Spec) -> Spec:
    """The spec under its registered name (an alias resolved), its options checked."""
    item = registry.get(kind, spec.name)
    resolve_options(kind.rstrip("s"), item.name, item.options, dict(spec.options))
    return Spec(item.name, spec.options)


def canonical_method(registry, method: Method, model_schedule: str | None = None) -> Method:
    """The method with registered names (aliases resolved), checked options and its schedule
    resolved (the model's preferred one, `Denoiser.default_schedule`, else the sampler's
    default, when none is named); with CellSpec's order-free identity, equal methods give
    equal cells."""
    sampler = canonical(registry, "samplers", method.sampler)
    default = Spec.parse(model_schedule or registry.get("samplers", sampler.name).default_schedule)
    schedule = canonical(registry, "schedules", method.schedule or default)
    mods = tuple(canonical(registry, "modifiers", m) for m in method.modifiers)
    return Method(sampler, schedule, mods)


# --- The cell's identity ----------------------------------------------------------------

@dataclass(frozen=True)
class CellSpec:
    """Everything that decides a cell's numbers; its identity's hash is the cell id.

    `seed` is the first sample seed: sample i of the cell draws from seed + i, so the cell
    samples seeds seed .. seed + num_samples - 1. `metrics` pairs each metric with the
    `dist==version` that registered it and `metric_options` are the run's metric options
    (e.g. `ref_stats`): both change what a number means, so both are identity. The plugin
    versions of sampler, schedule and modifiers are recorded but are not identity: a
    sampler that got worse in a new version is a regression, not "not comparable".
    """

    model: str
    method: Method
    nfe: int
    num_samples: int = DEFAULTS["num_samples"]
    seed: int = 0
    metrics: tuple[tuple[str, str], ...] = ()
    metric_options: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"  # the device type; a speed option like the three below
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    prompts: str = ""  # the digest of the run's --prompts file (bench.conditioning), if one was given

    # What cells are matched by across runs, and what else must agree for a comparison
    KEY = ("model", "sampler", "schedule", "modifiers", "nfe")

    def identity(self) -> dict[str, Any]:
        """The cell as plain JSON: the record's `spec`."""
        speed = {k: getattr(self, k) for k in SPEED_DEFAULTS if getattr(self, k) != SPEED_DEFAULTS[k]}
        return {
            "model": self.model,
            "sampler": sorted_spec(self.method.sampler),
            "schedule": sorted_spec(self.method.schedule),
            "modifiers": [sorted_spec(m) for m in self.method.modifiers],
            "nfe": self.nfe,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metrics": {name: version for name, version in self.metrics},
            "metric_options": dict(self.metric_options),
            "device": self.device,
            **speed,
            **({"prompts": self.prompts} if self.prompts else {}),
        }

    @property
    def id(self) -> str:
        return digest(self.identity())[:16]

    def seeds(self, indices: Tensor) -> Tensor:
        """The seeds of the cell's samples at positions `indices`."""
        return torch.as_tensor(indices, dtype=torch.long) + self.seed


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What makes two cells of the same key incomparable: `key a -> b` per differing field of
    their identities (`spec` of their records), metric versions named one by one."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in CellSpec.KEY:
            continue
        va, vb = a.get(k), b.get(k)
        if k == "metrics" and isinstance(va, dict) and isinstance(vb, dict):
            out += [f"metric {m} {va.get(m)} -> {vb.get(m)}" for m in sorted(set(va) | set(vb))
                    if va.get(m) != vb.get(m)]
        elif va != vb:
            out.append(f"{k} {va} -> {vb}")
    return out


# --- Loading a model --------------------------------------------------------------------


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device this machine has, or a one-line UsageError."""
    if isinstance(name, torch.device):
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: '{name}' is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: '{name}' is not supported; use cpu, cuda or cuda:N")
    return device


def load_model(spec: str, device: torch.device | str = "cpu", registry=None,
               options: Mapping[str, Any] | None = None) -> Denoiser:
    """A model spec `name[:arg][;key=value]` through its registered ModelSource; run-wide
    `options` (e.g. trust_pickle) reach the sources that declare them."""
    from .plugins import registry as installed

    registry = registry or installed()
    device = resolve_device(device)
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
    # One untimed call, so the first cell does not pay for lazy initialisation; it also
    # checks, before any sampling, that the network takes and returns the declared shape
    x = torch.zeros(1, *denoiser.shape, device=device)
    try:
        with torch.inference_mode():
            out = denoiser(x, denoiser.sigma_max)
    except (UsageError, ModelLoadError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"model '{spec}' fails on a batch of declared shape {tuple(denoiser.shape)}: "
                             f"{type(exc).__name__}: {first[:200]}; check its shape") from None
    out = out[0] if isinstance(out, tuple) else out
    if tuple(out.shape) != tuple(x.shape):
        raise ModelLoadError(f"model '{spec}' returns shape {tuple(out.shape)[1:]} for declared shape "
                             f"{tuple(denoiser.shape)}; declare the shape it denoises")
    return denoiser


# --- The recipe: a cell worked out without sampling -----------------------------------------


@dataclass
class Recipe:
    """What a cell will do, worked out without sampling (`resolve`): the sampler with its
    options resolved and its plan for the budget, the schedule with its options, and, given a
    model, the sigmas; `sigmas` stays None while a searched schedule has yet to search for the
    cell (`searched`). `build` completes it; the runner's pre-run checks, the fit-cost
    estimates, `bench search` and the conformance kit read it."""

    spec: CellSpec
    sampler: Sampler
    options: dict[str, Any]  # the sampler's options, resolved, with those the plan sets
    plan: Plan
    schedule: Schedule
    schedule_spec: Spec
    schedule_options: dict[str, Any]
    sigmas: Tensor | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def stochastic(self) -> bool:
        """Whether the sampler, with these options, draws fresh noise as it solves."""
        return self.sampler.draws_noise(self.options)

    @property
    def searched(self) -> bool:
        """Whether a searched schedule finds the sigmas for this very cell (Schedule.fit); a
        sampler's own time steps take precedence."""
        return self.schedule.fit is not None and self.plan.sigmas is None

    def label(self) -> str:
        """The method as tables show it: `heun`, `unipc @ld3`."""
        return self.spec.method.label(self.sampler.default_schedule)

    def fit_cell(self) -> dict[str, Any]:
        """What a searched schedule is told of its cell (and keys its cache by)."""
        return {"model": self.spec.model, "sampler": self.sampler.name, "sampler_options": self.options,
                "nfe": self.spec.nfe}

    def schedule_args(self, denoiser: Denoiser, device) -> tuple[tuple, dict[str, Any]]:
        """The schedule's positional and keyword arguments for this cell on `denoiser`."""
        return ((self.plan.steps, denoiser.sigma_min, denoiser.sigma_max),
                {"to_zero": self.plan.to_zero, "denoiser": denoiser, "device": device,
                 **self.schedule_options})


def resolve(registry, spec: CellSpec, model: Denoiser | None = None, device=None) -> Recipe:
    """The cell's recipe: options resolved (a UsageError names a bad one), the budget planned
    (Infeasible if it cannot be spent exactly), the schedule chosen (the method's, else the
    model's preferred, else the sampler's default) and, given the model, the sigmas made and
    checked (a searched schedule's options checked, its sigmas left to `build`). Cheap: no
    network call, except what a schedule itself asks of the model."""
    sampler = registry.get("samplers", spec.method.sampler.name)
    options = resolve_options("sampler", sampler.name, sampler.options, dict(spec.method.sampler.options))
    plan = plan_cell(sampler, spec.nfe, options)
    sched_spec = spec.method.schedule or Spec.parse(getattr(model, "default_schedule", None)
                                                    or sampler.default_schedule)
    schedule = registry.get("schedules", sched_spec.name)
    sched_options = resolve_options("schedule", schedule.name, schedule.options, dict(sched_spec.options))
    recipe = Recipe(spec, sampler, {**options, **plan.options}, plan, schedule, sched_spec, sched_options)
    if model is None:
        return recipe
    device = model_device(model, spec, device)
    try:
        recipe.sigmas = make_sigmas(schedule, sched_options, plan, model, device)
    except Infeasible:
        if not recipe.searched:
            raise
    return recipe


def model_device(model: Denoiser, spec: CellSpec, device=None) -> torch.device:
    """The device a cell runs on: the one given, else its model's, else the spec's."""
    if device is not None:
        return torch.device(device)
    return next((p.device for p in model.parameters()), torch.device(spec.device))


def make_sigmas(schedule, options, plan: Plan, denoiser: Denoiser, device) -> Tensor:
    """The schedule's sigmas for a plan (or the sampler's own), checked: plan.steps + 1 of
    them, decreasing. A searched schedule is searched for its cell by `build`: here it is
    Infeasible."""
    if plan.sigmas is not None:  # the sampler's own time steps
        sigmas, what = plan.sigmas(denoiser, device), "the sampler's own time steps"
    elif schedule.fit is not None:  # a searched schedule: `build` searches it for its cell (fit_schedule)
        if schedule.estimate is not None:  # its options checked
            schedule.estimate(plan.steps, denoiser.sigma_min, denoiser.sigma_max, to_zero=plan.to_zero,
                              denoiser=denoiser, device=device, cell=None, **options)
        raise Infeasible(f"schedule '{schedule.name}' is searched for its cell; build the cell (bench.build)")
    else:
        sigmas = schedule.sigmas(plan.steps, denoiser.sigma_min, denoiser.sigma_max, to_zero=plan.to_zero,
                                 denoiser=denoiser, device=device, **options)
        what = f"schedule '{schedule.name}'"
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device)
    if len(sigmas) != plan.steps + 1 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise PluginError(f"{what} gave {len(sigmas)} sigmas for {plan.steps} steps or they do not decrease")
    return sigmas


def fit_schedule(recipe: Recipe, denoiser: Denoiser, device) -> tuple[Tensor, dict[str, Any]]:
    """A searched schedule's sigmas for the cell (`Schedule.fit`), checked as make_sigmas
    checks them, and the record of its search: its network calls on a counter outside the
    budget and its seconds (schedule_fit_nfe, schedule_fit_s), and what it says it did."""
    counter, found = CountingDenoiser(denoiser), {}

    def search(*args: Any, **kwargs: Any) -> Tensor:
        sigmas, info = recipe.schedule.fit(*args, cell=recipe.fit_cell(), **kwargs)
        found.update(info)
        return sigmas

    start = time.perf_counter()
    sigmas = make_sigmas(replace(recipe.schedule, sigmas=search, fit=None), recipe.schedule_options,
                         recipe.plan, counter, device)
    plain = {k: v for k, v in found.items() if isinstance(v, str | int | float | bool)}
    return sigmas, {"schedule_fit_nfe": counter.nfe + counter.extra,
                    "schedule_fit_s": time.perf_counter() - start, "schedule_fitted": plain}


def fit_estimates(recipe: Recipe, model: Denoiser, device, call_s) -> list[str]:
    """One line per fit stage of the cell that is not cached (a searched schedule's search, a
    sampler's prepare), with its estimated network calls and seconds; `call_s(batch)` is the
    seconds of one forward pass at that batch size. [] when everything is cached."""
    where, out, sigmas = f"{recipe.label()} @ NFE {recipe.spec.nfe}", [], recipe.sigmas
    schedule, sampler = recipe.schedule, recipe.sampler
    if recipe.searched:
        args, kwargs = recipe.schedule_args(model, device)
        est = schedule.estimate(*args, cell=recipe.fit_cell(), call_s=call_s, **kwargs) \
            if schedule.estimate else None
        if est:
            out.append(f"{where}: schedule {recipe.schedule_spec} searches first, about {est['calls']} "
                       f"network calls, {est['seconds']:.0f} s (not cached)")
        else:  # found: its sigmas, for the sampler's own estimate
            sigmas = schedule.fit(*args, cell=recipe.fit_cell(), **kwargs)[0]
    if sampler.estimate is not None and sigmas is not None:
        est = sampler.estimate(model, sigmas, recipe.options, call_s)
        if est:
            out.append(f"{where}: {sampler.name} fits first, about {est['calls']} network calls, "
                       f"{est['seconds']:.0f} s (not cached)")
    return out


@dataclass
class Sampled:
    """One batch's samples and what sampling them cost."""

    x0: Tensor
    eps: Tensor
    indices: Tensor
    seeds: Tensor
    nfe: int
    extra: int
    extra_cost: float
    wall: float
    model_s: float
    decode_s: float = 0.0  # the model's decode (a latent model's VAE), timed apart


@dataclass
class Solve:
    """A built cell: the sampler, its plan and options, the sigmas, the counted (and
    modified) model and what `prepare` chose. `sample(indices)` draws those samples."""

    spec: CellSpec
    sampler: Sampler
    plan: Plan
    options: dict[str, Any]  # resolved sampler options with the plan's
    schedule: str  # the schedule spec used, or "own" for a sampler's own time steps
    sigmas: Tensor
    counter: CountingDenoiser
    model: Denoiser  # the modifiers' stack on the counter: what the sampler calls
    applied: list[str] = field(default_factory=list)
    prepared: dict[str, Any] = field(default_factory=dict)  # extra sample options from prepare
    prep: dict[str, Any] = field(default_factory=dict)  # prepare_nfe, prepare_s, prepared
    draws: int = field(init=False)  # noise draws a batch takes, learnt per batch

    def __post_init__(self) -> None:
        self.draws = self.plan.steps if self.stochastic else 0  # a first guess

    @property
    def stochastic(self) -> bool:
        """Whether the cell's sampler, with its options, draws fresh noise as it solves."""
        return self.sampler.draws_noise(self.options)

    def sample(self, indices: Iterable[int] | Tensor, noise_seed: int | None = None) -> Sampled:
        """The samples at cell positions `indices`, each from its own seed, the solve timed
        (wall and in-network); the budget is enforced by the counter. `noise_seed` gives a
        stochastic sampler's later draws another first seed than the latent's (a check)."""
        indices = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices,
                                  dtype=torch.long)
        seeds = self.spec.seeds(indices)
        device = self.sigmas.device
        shape = tuple(self.model.shape)
        noise = SampleNoise(self.spec.seed, indices, shape, device)
        eps = noise()
        if noise_seed is not None:  # the same latent, then another stream
            noise = SampleNoise(noise_seed, indices, shape, device)
            noise()
        stream = NoiseAhead(noise, self.draws, eps)
        self.model.select(indices)  # the batch's conditioning (its prompts, say)
        self.counter.reset()
        self.counter.batch = len(indices)
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            x0 = self.sampler.sample(self.model, eps * self.sigmas[0], self.sigmas, noise=stream,
                                     **self.options, **self.prepared)
        synchronize(device)
        wall = time.perf_counter() - start
        self.draws = stream.draws
        sampled = Sampled(x0, eps, indices, seeds, self.counter.nfe, self.counter.extra,
                          self.counter.extra_cost, wall, self.counter.model_s)
        # The images: a latent model decodes its samples, outside the sampling time
        start = time.perf_counter()
        with torch.inference_mode():
            images = self.model.decode(x0)
        synchronize(device)
        if images is not x0:
            sampled.x0, sampled.decode_s = images, time.perf_counter() - start
        return sampled

    def record(self) -> dict[str, Any]:
        """The plan's and preparation's fields of the cell's record."""
        return {
            "steps": self.plan.steps,
            "plan_nfe": self.plan.nfe,
            "options": {**self.options},
            "schedule": self.schedule,
            # the terminal convention (README, Protocol): stop at the last positive sigma, or
            # spend a last call there to denoise to 0
            "terminal": "to zero" if float(self.sigmas[-1]) == 0 else "sigma_min",
            "sigmas": [round(float(s), 6) for s in self.sigmas],
            "stochastic": self.stochastic,
            **({"modifiers_applied": self.applied} if self.applied else {}),
            **self.prep,
        }


class NoiseAhead:
    """A batch's noise stream with its next `n` draws made before the solve is timed: the
    same numbers, without the per-sample generators' cost (a CPU call per sample per draw)
    in the sampler's wall-clock. Draws past them are made when asked; at most
    AHEAD_BYTES are held."""

    def __init__(self, noise: SampleNoise, n: int, like: Tensor) -> None:
        n = min(n, AHEAD_BYTES // max(1, like.numel() * like.element_size()))
        self.noise, self.ahead, self.draws = noise, deque(noise() for _ in range(n)), 0

    def __call__(self) -> Tensor:
        self.draws += 1
        return self.ahead.popleft() if self.ahead else self.noise()


AHEAD_BYTES = 1 << 30


def plan_cell(sampler: Sampler, nfe: int, options: Mapping[str, Any]) -> Plan:
    """The sampler's plan for the budget, or Infeasible; a planner that breaks its contract
    is a PluginError naming the sampler."""
    try:
        plan = sampler.plan(nfe, options)
    except BenchError:
        raise
    except Exception as exc:
        raise PluginError(f"sampler '{sampler.name}': its planner raised {type(exc).__name__}: {exc}") \
            from exc
    if not isinstance(plan, Plan):
        raise PluginError(f"sampler '{sampler.name}': its planner returned {type(plan).__name__}, "
                          "not a bench.Plan")
    return plan


def stack(registry, spec: CellSpec, counter: CountingDenoiser, schedule: str) -> tuple[Denoiser, list[str]]:
    """The modifiers on top of the counter, innermost first; the counter then counts the
    budget at the resolution the sampler sees (calls at others are extra). A modifier that
    takes the cell gets it with the schedule actually used (`schedule`)."""
    model: Denoiser = counter
    applied = []
    for mod in spec.method.modifiers:
        model = apply_modifier(registry, spec, mod, model, schedule)
        applied.append(model.applied or str(mod))
    counter.count_shape = tuple(model.shape)
    return model, applied


def apply_modifier(registry, spec: CellSpec, mod: Spec, model: Denoiser, schedule: str) -> Denoiser:
    """One modifier of the cell on `model`, with its options (and the cell, if it takes it)."""
    modifier = registry.get("modifiers", mod.name)
    params = resolve_options("modifier", mod.name, modifier.options, dict(mod.options))
    if modifier.takes_cell:
        params["cell"] = {"model": spec.model, "sampler": str(spec.method.sampler),
                          "schedule": schedule, "nfe": spec.nfe}
    return modifier.apply(model, **params)


def target_model(registry, spec: CellSpec, model: Denoiser, cache: dict[Any, Any]) -> Denoiser:
    """The model whose ODE the cell solves: `model` with the cell's target modifiers
    (`Modifier.target`, guidance) applied in order, uncounted; one object per modifier chain
    for the run (`cache`), so a fingerprint memo keyed by it stays valid."""
    chain = tuple(m for m in spec.method.modifiers if registry.get("modifiers", m.name).target)
    if not chain:
        return model
    key = ("target-model", id(model), tuple(sorted_spec(m) for m in chain))
    if key not in cache:
        target = model
        for mod in chain:
            target = apply_modifier(registry, spec, mod, target, str(spec.method.schedule))
        cache[key] = (model, target)  # the model kept alive with it: its id stays its own
    return cache[key][1]


def build(registry, spec: CellSpec, model: Denoiser, device: torch.device | str | None = None,
          prepare_kwargs: Mapping[str, Any] | None = None) -> Solve:
    """The cell ready to sample: its recipe (`resolve`: options, plan, sigmas), a searched
    schedule searched for the cell outside the budget (schedule_fit_nfe, schedule_fit_s), the
    NFE counter on the model and the modifiers on the counter, then the sampler's `prepare`
    run on that very stack, outside the budget (its calls and seconds recorded as
    prepare_nfe, prepare_s). `prepare_kwargs` reach `prepare` as keywords (a plugin's own
    command, e.g. `bench fit`'s force and out)."""
    device = model_device(model, spec, device)
    recipe = resolve(registry, spec, model, device)
    fitted: dict[str, Any] = {}
    if recipe.searched:  # searched for this cell, counted apart
        recipe.sigmas, fitted = fit_schedule(recipe, model, device)
    # The counter on the model, the modifiers on the counter
    counter = CountingDenoiser(model, budget=spec.nfe)
    top, applied = stack(registry, spec, counter, str(recipe.schedule_spec))
    solve = Solve(spec, recipe.sampler, recipe.plan, recipe.options,
                  "own" if recipe.plan.sigmas else str(recipe.schedule_spec), recipe.sigmas, counter, top,
                  applied)
    # The sampler's own preparation (e.g. fitting a predictor) on the model it will sample
    if recipe.sampler.prepare is not None:
        counter.reset()  # a modifier may have probed the model while it was applied
        counter.budget = None
        start = time.perf_counter()
        try:
            prepared = dict(recipe.sampler.prepare(top, recipe.sigmas, recipe.options,
                                                   **(prepare_kwargs or {})))
        finally:
            counter.budget = spec.nfe
        solve.prepared = prepared
        plain = {k: v for k, v in prepared.items() if isinstance(v, str | int | float | bool)}
        solve.prep = {"prepare_nfe": counter.nfe + counter.extra, "prepare_s": time.perf_counter() - start,
                      "prepared": plain}  # what prepare chose (e.g. which predictor)
        counter.reset()
    solve.prep.update(fitted)
    return solve
