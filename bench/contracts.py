"""The contracts every plugin implements (the EDM / k-diffusion sigma formulation).

x = x0 + sigma * eps. A Denoiser returns x0_hat = D(x, sigma); samplers integrate the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (or its SDE) from sigma_max
down a schedule of sigmas. Plugins register the dataclasses below through the hooks in
`bench.hookspecs`; the harness counts NFE, draws noise and times everything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import PluginError
from .options import cast_like, check_finite, resolve_options  # noqa: F401 -- re-exported

# --- Denoiser -------------------------------------------------------------------------


class Denoiser(torch.nn.Module):
    """D(x, sigma, **cond) -> x0_hat, with x = x0 + sigma * eps and sigma of shape [B].

    Subclasses set `sigma_min`, `sigma_max`, `sigma_data` and `shape` (C, H, W) and
    implement `forward`. `__call__` accepts a Python float or 0-dim sigma and broadcasts
    it to [B], so samplers may pass the scalar of the current step. Discrete-time models
    override `round_sigma`; models built on a network expose it as `net` for modifiers.
    A model that can return its UNet bottleneck feature sets `has_bottleneck = True` and
    accepts `return_bottleneck=True`, returning `(x0_hat, feature [B, C, h, w])` from the
    same single network call. `default_schedule` (a schedule spec, e.g. "flow" for a
    flow-matching model) replaces the sampler's default where a method names none.

    Optional members, None where a model has none (a wrapper forwards them from `inner`):
    `data_samples(n, seed) -> [n, C, H, W]`, real data drawn from the distribution the model
    was trained on (the metrics' real-data floor); `moments() -> (mean, covariance)`, the
    exact data moments of an analytic model (metric `fd`); `prompts`, a text model's prompt
    set (CLIP score). A modifier's returned model may set `applied`, a one-line account of
    what it did, which the cell records.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    shape: tuple[int, int, int] = (1, 8, 8)
    has_bottleneck: bool = False
    default_schedule: str | None = None  # the model's preferred schedule, if any
    spec: str = ""  # the model spec it was loaded from (set by the runner), for cache keys
    data_samples: Callable[[int, int], Tensor] | None = None
    moments: Callable[[], tuple[Tensor, Tensor]] | None = None
    prompts: tuple[str, ...] | None = None
    applied: str | None = None

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return super().__call__(x, sigma, **cond)

    # A property, not a class attribute: a class-level `net = None` would shadow the
    # submodule that nn.Module registers on `self.net = network`.
    @property
    def net(self) -> torch.nn.Module | None:
        """The underlying network, for modifiers (a registered submodule), or None."""
        return self._modules.get("net")

    @net.setter
    def net(self, value: torch.nn.Module | None) -> None:
        self._modules["net"] = value

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """The nearest sigma the model was trained on (identity for continuous time)."""
        return torch.as_tensor(sigma)

    def select(self, indices: Tensor) -> None:
        """Fix the conditioning of the next batch: the samples at cell positions `indices`
        (a text model takes prompt i for sample i). Unconditional models ignore it."""

    def decode(self, x0: Tensor) -> Tensor:
        """The images of the model's samples (a latent model's VAE decode; identity in
        pixel space), in the data range metrics expect. Not counted as NFE; timed apart."""
        return x0

    def describe(self) -> dict[str, Any]:
        """What reports record about the model (subclasses add parameterization, weights)."""
        return {
            "class": type(self).__name__,
            "shape": list(self.shape),
            "sigma_min": float(self.sigma_min),
            "sigma_max": float(self.sigma_max),
            "sigma_data": float(self.sigma_data),
        }


class DenoiserWrapper(Denoiser):
    """A Denoiser around another (`inner`): the NFE counter, a modifier, a precision wrapper.

    It takes the inner model's sigma range, sigma_data, shape, spec, has_bottleneck and
    default_schedule (a subclass may set others after `super().__init__`, e.g. a new shape), forwards
    round_sigma, select, decode, describe, `net` and any attribute it lacks (an analytic model's moments,
    say) to it, and by default calls it. The network is reached through `inner`, never
    registered twice, so state dicts and fingerprints stay those of the model.
    """

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner = inner
        self.sigma_min, self.sigma_max, self.sigma_data = inner.sigma_min, inner.sigma_max, inner.sigma_data
        self.shape, self.spec = tuple(inner.shape), inner.spec
        self.has_bottleneck, self.default_schedule = inner.has_bottleneck, inner.default_schedule

    @property
    def net(self) -> torch.nn.Module | None:
        return self._modules["inner"].net

    @net.setter
    def net(self, value: torch.nn.Module | None) -> None:
        raise AttributeError("a DenoiserWrapper reaches its network through `inner`")

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Any:
        return self.inner(x, sigma, **cond)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        return self.inner.round_sigma(sigma)

    def select(self, indices: Tensor) -> None:
        self.inner.select(indices)

    def decode(self, x0: Tensor) -> Tensor:
        return self.inner.decode(x0)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    @property
    def data_samples(self) -> Callable[[int, int], Tensor] | None:  # type: ignore[override]
        return self._modules["inner"].data_samples

    @property
    def moments(self) -> Callable[[], tuple[Tensor, Tensor]] | None:  # type: ignore[override]
        return self._modules["inner"].moments

    @property
    def prompts(self) -> tuple[str, ...] | None:  # type: ignore[override]
        return self._modules["inner"].prompts

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def check_denoiser(denoiser: Any) -> None:
    """Raise PluginError unless `denoiser` satisfies the Denoiser contract."""
    if not isinstance(denoiser, Denoiser):
        raise PluginError(f"model source returned {type(denoiser).__name__}, not a bench.Denoiser")
    if not (0 < denoiser.sigma_min < denoiser.sigma_max):
        raise PluginError(
            f"denoiser sigma range [{denoiser.sigma_min}, {denoiser.sigma_max}] is not increasing"
        )
    if len(tuple(denoiser.shape)) != 3:
        raise PluginError(f"denoiser shape {denoiser.shape} is not (C, H, W)")


# --- Sampler --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How a sampler spends a budget: `steps` intervals of the schedule, `nfe` calls.

    `to_zero` says whether the schedule's last sigma is 0 (EDM) or sigma_min
    (diff-sampler's convention); `options` are the sampler options the plan sets.
    A sampler that fixes its own time steps (a diffusers scheduler's timesteps, say) sets
    `sigmas(denoiser, device) -> Tensor` of steps + 1 decreasing values; the cell's
    schedule is then not used and the record says so.
    """

    steps: int
    nfe: int
    to_zero: bool = False  # the protocol: stop at sigma_min (README)
    options: Mapping[str, Any] = field(default_factory=dict)
    sigmas: Callable[..., Tensor] | None = None


class NoiseFn(Protocol):
    def __call__(self) -> Tensor:
        """Fresh standard normal noise shaped like the batch, from per-sample streams."""


SampleFn = Callable[..., Tensor]
PlanFn = Callable[[int, Mapping[str, Any]], Plan]


@dataclass(frozen=True)
class Sampler:
    """A stateless sampler: `sample(denoiser, x, sigmas, *, noise, callback, **options)`.

    `x` is the initial latent already scaled by sigmas[0]; the result is x0.
    `plan(nfe, options)` maps a budget to a Plan or raises `bench.errors.Infeasible`.
    `nfe_rule` is the one-line rule shown by `bench list`, e.g. "NFE = steps".
    `options` holds every option the sampler accepts, with its default.
    `prepare(denoiser, sigmas, options) -> dict`, if given, runs once per cell before
    sampling (e.g. fitting or loading a learned predictor); it returns extra sample options.
    Its network calls are counted apart (`prepare_nfe`, `prepare_s`), never in the budget.
    `estimate(denoiser, sigmas, options, call_s) -> {"calls", "seconds"} | None`, if given,
    is what prepare would cost when nothing is cached (None when it is), `call_s(batch)`
    being the seconds of one forward pass; `bench run` prints it before the run.
    `stochastic` says whether it draws fresh noise at its defaults; `stochastic_when(options)`,
    if given, says it for other options (churn > 0, eta > 0): a stochastic cell's distance to
    the ODE's solution is no convergence error, so metrics that need one skip it.
    """

    name: str
    sample: SampleFn
    plan: PlanFn
    nfe_rule: str
    description: str
    default_schedule: str = "karras"
    stochastic: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[..., Mapping[str, Any]] | None = None
    aliases: tuple[str, ...] = ()  # other names that resolve to it (k-diffusion's, say)
    estimate: Callable[..., Mapping[str, float] | None] | None = None
    stochastic_when: Callable[[Mapping[str, Any]], bool] | None = None

    def draws_noise(self, options: Mapping[str, Any]) -> bool:
        """Whether the sampler with these (resolved) options draws fresh noise as it solves:
        `stochastic_when(options)` where the options decide (EDM churn, eta), else `stochastic`."""
        return bool(self.stochastic_when(options)) if self.stochastic_when is not None else self.stochastic


# --- Schedule -------------------------------------------------------------------------


ScheduleFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Schedule:
    """`sigmas(n, sigma_min, sigma_max, *, to_zero, denoiser, device, **options)`.

    Returns a decreasing float tensor of n + 1 sigmas starting at sigma_max: with
    `to_zero` n sigmas down to sigma_min followed by 0, without it n + 1 sigmas down to
    sigma_min. Discrete schedules snap with `denoiser.round_sigma`.

    A searched (learned) schedule also sets `fit`: the same arguments plus `cell` (the
    cell's "model", "sampler", "sampler_options" and "nfe"), returning (sigmas, info). A
    cell's build calls it instead of `sigmas` on an NFE counter outside the budget and
    records its calls and seconds as `schedule_fit_nfe`, `schedule_fit_s` and `info` as
    `schedule_fitted`. `estimate`, with those arguments plus `call_s(batch)` (seconds of one
    forward pass), is {"calls", "seconds"} of a search not yet cached, or None.
    `featured` names the samplers that `--samplers all` also runs on this schedule (the
    pairings its plugin ships results for), beside each sampler on its default schedule.
    """

    name: str
    sigmas: ScheduleFn
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other names that resolve to it (k-diffusion's, say)
    fit: Callable[..., tuple[Tensor, Mapping[str, Any]]] | None = None
    estimate: Callable[..., Mapping[str, float] | None] | None = None
    featured: tuple[str, ...] = ()


# --- Modifier -------------------------------------------------------------------------


@dataclass(frozen=True)
class Modifier:
    """`apply(denoiser, **params) -> Denoiser`: transforms a model without changing samplers.

    It receives the NFE-counting denoiser, so every network call it makes is counted.
    With `takes_cell`, apply also gets `cell={"model", "sampler", "schedule", "nfe"}` (specs
    as strings), e.g. to look up settings tuned for that cell. The returned denoiser may set
    `applied`, a one-line account of what it did (the factors it used, say): each cell
    records it and reports show it. It may change `shape` (sampling at another resolution);
    the budget then counts calls at the new shape, others are counted as extra.
    With `target`, the modified model is another ODE, the one the cell sets out to solve
    (guidance), not an approximation of the model's (skip-tuning, upsample guidance):
    metrics that solve the model's ODE themselves (`reference`) solve the modified one.
    """

    name: str
    apply: Callable[..., Denoiser]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    takes_cell: bool = False
    target: bool = False


# --- Model source ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """`load(arg, device=..., **options) -> Denoiser` for a model spec `name[:arg]`.

    `default_metrics` are the metrics a run on this model uses when none are named.
    """

    name: str
    load: Callable[..., Denoiser]
    description: str
    default_metrics: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


# --- Metric ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """One reported number; `n` is the sample count it was computed from.

    `title` is what reports call it, e.g. "FID (digits)" (default: the value's key).
    """

    value: float
    higher_is_better: bool = False
    std: float | None = None
    n: int | None = None
    title: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Batch:
    """What a metric sees: samples x0, their unit initial noise eps, their positions in the
    cell (`indices`, 0..n-1) and the seeds their noise was drawn from (`seeds`)."""

    x0: Tensor
    eps: Tensor
    indices: Tensor
    sigma_max: float
    seeds: Tensor | None = None  # None: the seeds are run seed + indices


@dataclass
class MetricContext:
    """Run-wide facts for a metric; `cache` lives for the whole run (reference solves).

    `options` are the run's metric options (`RunConfig.metric_options`, e.g. `fid_weights`
    and `ref_stats` from `bench run --fid-weights/--ref-stats`).
    """

    model: str
    denoiser: Denoiser
    num_samples: int
    seed: int
    device: torch.device
    cache: dict[Any, Any]
    options: Mapping[str, Any] = field(default_factory=dict)


class MetricState(Protocol):
    def update(self, batch: Batch) -> None:
        """Consume one batch of samples."""

    def result(self) -> Mapping[str, Value]:
        """The named numbers after the last batch."""

    # Optional members the runner uses where a state has them:
    # `replicates(index_sets) -> {value name: float64 [B]}`, the values recomputed on the
    #   shared bootstrap index sets (bench.stats.index_sets; a state that subclasses
    #   bench.Bootstrapped has it), stored per cell so the verdict and compare pair cells;
    # `info() -> dict`, what the record keeps of the metric besides its values (its
    #   reference's solver and cost, say), under `metric_info.<metric name>`.


@dataclass(frozen=True)
class Metric:
    """`create(ctx) -> MetricState`: a streaming metric, fed batch by batch.

    With `floor`, the metric also scores real data at the run's sample count: the model's
    (`Denoiser.data_samples(n, seed)`), else the metric's own (`data_samples`, the real data
    set its reference comes from), when either can be drawn: the best value a sampler can
    reach at that n, which reports show beside the samplers' values. Metrics of the samples'
    own noise (rmse to a reference solve) have none. `applies(ctx) -> str | None`, if given,
    says in one line why the metric cannot score the run's model (an image size its feature
    network does not take, weights that are not there), or None; the runner asks it once the
    model is loaded, before any of its cells runs, and stops with that line (exit 2).
    `options` are the run metric options it reads (`--metric-option KEY=VALUE`), with their
    defaults. `default_for` lists image shapes (C, H, W) the metric scores by default: a
    model whose source names no metrics of its own and whose images have such a shape gets
    it (FID on MNIST's features for any 1x28x28 model). With `deterministic_only` the metric
    is not defined for a cell whose sampler draws fresh noise (a distance to the model's own
    ODE solution): such a cell records it as not applicable and is never ranked on it.
    `answers` is the question it answers, which verdicts show ("closest to the data")."""

    name: str
    create: Callable[[MetricContext], MetricState]
    description: str
    floor: bool = False
    applies: Callable[[MetricContext], str | None] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    data_samples: Callable[[int, int], Tensor] | None = None
    default_for: tuple[tuple[int, int, int], ...] = ()
    aliases: tuple[str, ...] = ()  # other names that resolve to it (an earlier version's, say)
    deterministic_only: bool = False
    answers: str = ""


# --- Reporter -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reporter:
    """`render(run, console)` writes a view of a finished run (`bench.Run`): its records, and
    `run.analysis` (bench.analysis: pooled cells, verdicts, marks), computed once per run and
    shared by every reporter."""

    name: str
    render: Callable[..., Any]
    description: str


PLUGIN_TYPES = {
    "samplers": Sampler,
    "schedules": Schedule,
    "models": ModelSource,
    "modifiers": Modifier,
    "metrics": Metric,
    "reporters": Reporter,
}
