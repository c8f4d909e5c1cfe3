"""The conformance suite: checks a plugin's own tests call on everything it registers.

    import pytest
    from bench.testing import check_sampler, samplers_of

    @pytest.mark.parametrize("name", samplers_of("my-plugin-dist"))
    def test_sampler_conformance(name):
        check_sampler(name)

A sampler is checked through the installed plugin (real entry-point discovery) and the
very code path of a run, `bench.build` (options, plan, sigmas, the NFE counter with the
cell's budget, modifiers, prepare) with the per-sample noise of runs, on the analytic
Gaussian (`bench.models.gaussian`), whose probability-flow ODE has a closed-form solution:

- NFE honesty: every budget is planned exactly (plan.nfe == budget) or refused with
  `bench.errors.Infeasible`; the counted calls equal the plan and never pass the budget;
- shapes: the output has the input's shape and dtype and is finite, on a non-square,
  multi-channel image;
- determinism: the same seed gives the same samples whatever the global RNG; a
  deterministic sampler ignores the noise stream, a stochastic one (`Sampler.stochastic`)
  draws from it and only from it;
- batch-size invariance: a sample does not depend on its batch mates;
- the protocol: no call outside the model's sigma range and no last call spent at
  sigma_min to denoise to 0 (`check_protocol`);
- convergence: a deterministic sampler's error to the exact ODE solution falls with NFE
  (at a measured order, if one is given); a stochastic sampler's samples match the exact
  data moments at a large budget.

`check_schedule` holds a schedule to n + 1 decreasing sigmas between the model's ends;
`check_modifier` holds a modifier to the NFE counter, repeatability, batch-size invariance
and neutral options that change nothing, on a real network (`random_unet` needs no weights).
A failure is an AssertionError that says which check broke, for which budget, and how.

What a plugin's own tests build on, beside the checks (the rest of what they need is in
`bench`: a cell is `bench.CellSpec`, its recipe `bench.resolve`, its solve `bench.build`):

- models: the analytic `gaussian` and `mixture` (exact denoisers, `gaussian`'s ODE solved
  in closed form), `random_unet` and the digits `UNet` / `UNetConfig` architecture,
  `EDMNetwork` (EDM's preconditioned networks as a Denoiser, as `edm:` models load them);
- `reference_solve`: a converged solve of a model's probability-flow ODE (the `rmse` metric's);
- the digits feature space of `fid-digits` / `kid-digits`: `digits_images`, `to_uint8`,
  `digits_features`, `digits_reference_features`;
- `load_registry` (a fresh registry, e.g. after installing a plugin), `methods_from` (the
  methods of a grid, as `bench run --samplers ...` makes them), `run_records` (the records
  of a `bench.RunConfig`, for a run the command line cannot say, e.g. with no metric);
- commands: `parse_command` (a command line as the parser reads it, commands of plugins
  included) and `console_width` (the width `bench.cli.main` prints its tables at).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from .cell import CellSpec, Method, Solve, Spec, build, load_model
from .config import RunConfig, methods_from
from .contracts import Denoiser, Sampler, Schedule, check_denoiser, resolve_options
from .errors import BudgetExceeded, Infeasible
from .metrics.reference import reference_solve
from .models.analytic import gaussian, mixture
from .models.digits import UNet, UNetConfig
from .models.edm import EDMNetwork
from .nfe import CountingDenoiser
from .plugins import load_registry
from .plugins import registry as installed
from .seeding import SampleNoise

__all__ = [
    "BUDGETS", "SEED", "SHAPE", "Case", "Solved", "check_batch_invariance", "check_convergence",
    "check_determinism", "check_modifier", "check_moments", "check_nfe", "check_planner", "check_protocol",
    "check_sampler", "check_schedule", "check_shapes", "ode_error", "registered_by", "registry",
    "samplers_of", "schedules_of", "single_threaded", "solve",
    # what a plugin's tests build on
    "EDMNetwork", "UNet", "UNetConfig", "console_width", "digits_features", "digits_images",
    "digits_reference_features", "gaussian", "load_registry", "methods_from", "mixture", "parse_command",
    "random_unet", "reference_solve", "run_records", "to_uint8",
]

SHAPE = (2, 4, 6)  # channels and a non-square image, so that hard-coded shapes show
BUDGETS = tuple(range(1, 13))
SEED = 0

T = TypeVar("T")


def single_threaded(check: Callable[..., T]) -> Callable[..., T]:
    """Run a check with one intra-op thread: its tensors are tiny, and idle OpenMP threads
    spinning on a busy shared machine cost more than the work."""

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> T:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


registry = installed  # the installed plugins, loaded once per process (cache_clear() reloads)


def registered_by(dist: str, kind: str) -> list[str]:
    """The names of `kind` ("samplers", "schedules", ...) that distribution `dist` registered;
    fails if the distribution is not installed or did not load."""
    plugins = [p for p in registry().plugins if p.dist.lower().replace("_", "-") == dist.lower()]
    assert plugins, f"no installed distribution '{dist}' has a `bench` entry point (pip install it first)"
    for p in plugins:
        assert p.error is None, f"{dist}: plugin '{p.name}' failed to load: {p.error}"
    return [name for p in plugins for name in p.registered.get(kind, [])]


def samplers_of(dist: str) -> list[str]:
    return registered_by(dist, "samplers")


def schedules_of(dist: str) -> list[str]:
    return registered_by(dist, "schedules")


# --- Solving one case ---------------------------------------------------------------------


@dataclass
class Case:
    """A sampler with its options and schedule (and modifiers), on the analytic Gaussian."""

    name: str
    sampler: Sampler
    options: dict[str, Any]  # resolved: what the planner sees
    schedule: Schedule
    schedule_options: dict[str, Any]
    model: Denoiser  # the analytic Gaussian unless a check needs another model
    stochastic: bool
    given: tuple[tuple[str, str], ...] = ()  # the options as a run's spec writes them
    modifiers: tuple[Spec, ...] = ()  # applied over the NFE counter, as in a run
    built: dict[tuple[int, int], Solve] = field(default_factory=dict)  # by (budget, seed)

    @classmethod
    def of(
        cls,
        name: str,
        options: Mapping[str, Any] | None = None,
        shape=SHAPE,
        stochastic: bool | None = None,
        model: Denoiser | None = None,
        modifiers: Sequence[Spec] = (),
    ) -> Case:
        """`stochastic` overrides what the sampler declares for these options (`draws_noise`);
        `model` replaces the analytic Gaussian of shape `shape`."""
        sampler = registry().get("samplers", name)
        spec = Spec.parse(sampler.default_schedule)
        schedule = registry().get("schedules", spec.name)
        given = tuple((k, str(v)) for k, v in (options or {}).items())
        return cls(
            sampler.name,
            sampler,
            resolve_options("sampler", name, sampler.options, dict(given)),
            schedule,
            resolve_options("schedule", spec.name, schedule.options, dict(spec.options)),
            gaussian(shape=shape) if model is None else model,
            sampler.draws_noise(resolve_options("sampler", name, sampler.options, dict(given)))
            if stochastic is None else stochastic,
            given,
            tuple(modifiers),
        )

    def feasible(self, budgets: Iterable[int]) -> list[int]:
        """The budgets the planner accepts."""
        out = []
        for nfe in budgets:
            try:
                self.sampler.plan(nfe, self.options)
            except Infeasible:
                continue
            out.append(nfe)
        return out

    def nearest(self, nfe: int, what: str) -> int:
        """The smallest feasible budget from `nfe` up to nfe + 3."""
        found = self.feasible(range(nfe, nfe + 4))
        assert found, f"{self.name}: no feasible budget in {nfe}..{nfe + 3} for the {what} check"
        return found[0]

    def solver(self, nfe: int, seed: int = SEED) -> Solve:
        """The cell at a budget, built by bench.build exactly as a run builds it (once)."""
        if (nfe, seed) not in self.built:
            spec = CellSpec(getattr(self.model, "spec", "") or "test", Method(Spec(self.name, self.given),
                            None, self.modifiers), nfe, seed=seed)
            self.built[(nfe, seed)] = build(registry(), spec, self.model, "cpu")
        return self.built[(nfe, seed)]


@dataclass
class Solved:
    x0: Tensor
    x_init: Tensor
    sigmas: Tensor
    nfe: int
    extra: int = 0  # calls at another resolution (a modifier's)


def solve(
    case: Case, nfe: int, indices: Sequence[int], seed: int = SEED, noise_seed: int | None = None
) -> Solved:
    """The case's samples for `indices` at a budget, exactly as a run draws them: initial
    noise from each sample's own seed, the budget enforced by the real NFE counter.
    `noise_seed` gives the sampler's later noise draws another seed than the latent's."""
    s = case.solver(nfe, seed)
    try:
        out = s.sample(indices, noise_seed=noise_seed)
    except BudgetExceeded as exc:
        raise AssertionError(f"{case.name} at a budget of {nfe} NFE: {exc}") from None
    return Solved(out.x0, out.eps * s.sigmas[0], s.sigmas, out.nfe, out.extra)


# --- The checks -----------------------------------------------------------------------------


@single_threaded
def check_planner(case: Case, budgets: Iterable[int] = BUDGETS) -> list[int]:
    """Each budget is planned exactly or refused with Infeasible; returns the feasible ones."""
    feasible = []
    for nfe in budgets:
        try:
            plan = case.sampler.plan(nfe, case.options)
        except Infeasible as exc:
            assert str(exc), f"{case.name}: Infeasible for NFE {nfe} must say why"
            continue
        except Exception as exc:
            raise AssertionError(
                f"{case.name}: planner raised {type(exc).__name__} for NFE {nfe}; a budget it cannot "
                "meet must raise bench.errors.Infeasible"
            ) from exc
        assert plan.nfe == nfe, f"{case.name}: planned {plan.nfe} NFE for a budget of {nfe}; plan it exactly"
        assert plan.steps >= 1, f"{case.name}: planned {plan.steps} steps for NFE {nfe}"
        feasible.append(nfe)
    assert feasible, f"{case.name}: no budget in {list(budgets)} is feasible"
    return feasible


@single_threaded
def check_nfe(case: Case, budgets: Iterable[int]) -> None:
    """Counted calls equal the plan at every feasible budget (the counter stops overspending)."""
    for nfe in budgets:
        counted = solve(case, nfe, range(3)).nfe
        assert counted == nfe, f"{case.name}: planned {nfe} NFE, the counter saw {counted} network calls"


@single_threaded
def check_shapes(case: Case, nfe: int) -> None:
    """The output has the input's shape and dtype, and is finite."""
    s = solve(case, nfe, range(3))
    assert isinstance(s.x0, Tensor), f"{case.name}: sample() returned {type(s.x0).__name__}, not a tensor"
    assert s.x0.shape == s.x_init.shape, (
        f"{case.name}: output shape {tuple(s.x0.shape)} for input {tuple(s.x_init.shape)}"
    )
    assert s.x0.dtype == s.x_init.dtype, f"{case.name}: output dtype {s.x0.dtype} for input {s.x_init.dtype}"
    assert bool(torch.isfinite(s.x0).all()), f"{case.name}: non-finite samples at NFE {nfe}"


@single_threaded
def check_determinism(case: Case, nfe: int) -> None:
    """Same seed, same samples, whatever the global RNG; noise only from the stream, and
    only for stochastic samplers."""
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(solve(case, nfe, range(4)).x0)
    assert torch.equal(*runs), (
        f"{case.name}: two runs with the same seed differ at NFE {nfe} "
        "(draw randomness only from the `noise` argument)"
    )
    other = solve(case, nfe, range(4), noise_seed=SEED + 1).x0
    if case.stochastic:
        assert not torch.equal(runs[0], other), f"{case.name} is stochastic but ignores its noise stream"
    else:
        assert torch.equal(runs[0], other), (
            f"{case.name} draws noise but is not declared stochastic for these options "
            "(Sampler(stochastic=True), or stochastic_when)"
        )


@single_threaded
def check_batch_invariance(case: Case, nfe: int) -> None:
    """A sample does not depend on its batch mates (same numbers up to float32 rounding)."""
    whole = solve(case, nfe, range(6))
    parts = [solve(case, nfe, idx) for idx in (range(2), range(2, 6))]
    split = torch.cat([p.x0 for p in parts])
    assert {p.nfe for p in parts} == {whole.nfe}, f"{case.name}: NFE depends on the batch size"
    assert torch.allclose(whole.x0, split, rtol=1e-5, atol=1e-5), (
        f"{case.name}: samples change with the batch size at NFE {nfe} "
        f"(max difference {float((whole.x0 - split).abs().max()):.3g})"
    )


def ode_error(case: Case, nfe: int, n: int = 8) -> float:
    """RMS distance of n samples to the exact ODE solution between the schedule's ends."""
    s = solve(case, nfe, range(n))
    exact = case.model.ode_solution(s.x_init.double(), float(s.sigmas[0]), float(s.sigmas[-1]))
    return float((s.x0.double() - exact).pow(2).mean().sqrt())


@single_threaded
def check_convergence(
    case: Case, low: int = 8, high: int = 128, order: float | None = None, tol: float = 0.01
) -> dict[int, float]:
    """Deterministic: the error to the exact ODE solution ends below `tol` and falls 8x from
    `low` to `high` NFE; with `order`, the order measured between high/2 and high is at
    least order - 0.5. Stochastic: `check_moments` at `high`. Returns the errors by NFE."""
    if case.stochastic:
        return check_moments(case, case.nearest(high, "convergence"))
    lo, mid, hi = (case.nearest(n, "convergence") for n in (low, high // 2, high))
    errors = {n: ode_error(case, n) for n in dict.fromkeys((lo, mid, hi) if order else (lo, hi))}
    assert errors[hi] < tol, f"{case.name}: error {errors[hi]:.3g} to the exact ODE solution at NFE {hi}"
    assert errors[hi] < errors[lo] / 8, f"{case.name}: the error does not fall with NFE: {errors}"
    if order is not None:
        measured = math.log(errors[mid] / errors[hi]) / math.log(hi / mid)
        assert measured >= order - 0.5, (
            f"{case.name}: measured order {measured:.2f} between NFE {mid} and {hi}, expected {order}"
        )
    return errors


@single_threaded
def check_moments(case: Case, nfe: int, n: int = 256) -> dict[int, float]:
    """The samples' per-pixel mean and variance match the exact data distribution's (at the
    schedule's last sigma): the mean square of their z-scores stays below 3 (about 1 when
    right; a variance 20% off gives about 10)."""
    s = solve(case, nfe, range(n))
    x = s.x0.double().reshape(n, -1)
    end = float(s.sigmas[-1])
    mu, var = case.model.mu[0], case.model.var[0] + end**2
    z_mean = (x.mean(0) - mu) / (var / n).sqrt()
    z_var = (x.var(0) / var - 1) * math.sqrt((n - 1) / 2)
    score = float(torch.cat([z_mean, z_var]).pow(2).mean())
    assert score < 3, (
        f"{case.name}: samples at NFE {nfe} miss the data moments (mean square z-score {score:.2f})"
    )
    return {nfe: score}


@single_threaded
def check_protocol(case: Case, nfe: int) -> None:
    """No network call that buys nothing: the sampler's calls stay within the model's sigma
    range, and it does not spend its last call denoising at sigma_min to jump to 0 (D(x,
    sigma_min) moves x by about sigma_min; measured worse or equal for every first-party
    solver at 3-20 NFE on digits and the mixture). Stopping at sigma_min is the protocol."""
    solve = case.solver(nfe)
    seen: list[float] = []
    hook = solve.counter.register_forward_pre_hook(lambda _m, args: seen.append(float(args[1].max())))
    try:
        solve.sample(range(2))
    finally:
        hook.remove()
    low = case.model.sigma_min * (1 - 1e-3)
    below = [s for s in seen if 0 < s < low]
    assert not below, f"{case.name}: network calls at sigma {below[:3]} below the model's sigma_min {low:.4g}"
    final_denoise = float(solve.sigmas[-1]) == 0 and seen and seen[-1] <= case.model.sigma_min * 1.001
    assert not final_denoise, (
        f"{case.name} spends its last call at sigma_min to denoise to 0 at NFE {nfe}: a call that buys "
        "nothing; stop the schedule at sigma_min by default (keep the final denoise as an option)"
    )


@single_threaded
def check_sampler(
    name: str,
    *,
    options: Mapping[str, Any] | None = None,
    budgets: Iterable[int] = BUDGETS,
    low: int = 8,
    high: int = 128,
    order: float | None = None,
    tol: float = 0.01,
    stochastic: bool | None = None,
    protocol: bool = True,
) -> dict[int, float]:
    """Every check on the installed sampler `name` with `options` (e.g. a smaller fit, or
    options that add noise, with `stochastic=True`); returns the convergence errors (or
    moment scores) by NFE. `protocol=False` skips `check_protocol`, for a peer reproduced as
    its library runs it (a diffusers scheduler ending with a denoise at sigma_min)."""
    case = Case.of(name, options, stochastic=stochastic)
    feasible = check_planner(case, budgets)
    check_nfe(case, feasible)
    nfe = feasible[len(feasible) // 2]
    check_shapes(case, nfe)
    check_determinism(case, nfe)
    check_batch_invariance(case, nfe)
    if protocol:
        check_protocol(case, nfe)
    return check_convergence(case, low, high, order, tol)


@single_threaded
def check_schedule(
    name: str, *, options: Mapping[str, Any] | None = None, steps: Iterable[int] = (1, 2, 5, 18)
) -> None:
    """n + 1 decreasing sigmas from sigma_max: to sigma_min then 0, or to sigma_min."""
    schedule = registry().get("schedules", name)
    opts = resolve_options("schedule", name, schedule.options, dict(options or {}))
    model = gaussian(shape=SHAPE)
    for n in steps:
        for to_zero in (True, False):
            sigmas = torch.as_tensor(
                schedule.sigmas(
                    n, model.sigma_min, model.sigma_max, to_zero=to_zero, denoiser=model, device="cpu", **opts
                )
            ).double()
            what = f"{name}: {n} steps, to_zero={to_zero}"
            assert sigmas.shape == (n + 1,), f"{what}: {len(sigmas)} sigmas, expected {n + 1}"
            assert bool((sigmas[:-1] > sigmas[1:]).all()), (
                f"{what}: sigmas do not decrease: {sigmas.tolist()}"
            )
            assert math.isclose(sigmas[0], model.sigma_max, rel_tol=1e-3), (
                f"{what}: starts at {float(sigmas[0])}"
            )
            end = [float(sigmas[-2]), float(sigmas[-1])] if to_zero else [float(sigmas[-1])]
            expect = [model.sigma_min, 0.0] if to_zero else [model.sigma_min]
            if to_zero and n == 1:  # one step: sigma_max, then 0
                end, expect = end[1:], expect[1:]
            assert all(
                math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-9) for a, b in zip(end, expect, strict=True)
            ), f"{what}: ends at {end}, expected {expect}"


def random_unet(seed: int = 0) -> Denoiser:
    """The digits UNet (named skips, a bottleneck) with random weights drawn from `seed` and
    EDM preconditioning: a real network for modifier checks that needs no weights file.
    Parameters initialised to zero (the output layer, norms' biases) get random values too,
    so that the output depends on every layer."""
    from .adapters import Preconditioned
    from .models.digits import SHAPE as DIGITS_SHAPE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet(UNetConfig()).eval()
        for p in net.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.1)
    return Preconditioned(net, "edm", DIGITS_SHAPE, has_bottleneck=True)


@single_threaded
def check_modifier(
    name: str,
    *,
    model: str | Denoiser = "digits",
    options: Mapping[str, Any] | None = None,
    neutral: Mapping[str, Any] | None = None,
    sampler: str = "euler",
    nfe: int = 4,
) -> None:
    """The modifier `name` with `options` on `model` (a model spec or a Denoiser): it returns a
    Denoiser; every network call it makes passes the NFE counter beneath it; `sampler`'s samples
    through it are finite, shaped like the modified model, repeatable and independent of their
    batch mates; with the `neutral` options (e.g. a guidance weight of 0) it computes exactly
    what the model computes."""
    modifier = registry().get("modifiers", name)
    base = load_model(model, torch.device("cpu"), registry=registry()) if isinstance(model, str) else model
    mod = Spec(name, tuple((k, str(v)) for k, v in (options or {}).items()))
    case = Case.of(sampler, model=base, modifiers=(mod,))
    # A Denoiser comes back (built as a run builds it, before the calls below are counted: a
    # modifier may probe the model once), and sampling through it is counted
    check_denoiser(case.solver(nfe).model)
    calls = []
    hook = (base.net or base).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        s = solve(case, nfe, range(3))
    finally:
        hook.remove()
    assert len(calls) == s.nfe + s.extra, (
        f"{name}: the network ran {len(calls)} times, the counter saw {s.nfe} + {s.extra} extra; "
        "call the denoiser the modifier receives, not the network beneath it"
    )
    assert bool(torch.isfinite(s.x0).all()), f"{name}: non-finite samples"
    with torch.inference_mode():  # a latent model's samples are its decoded images
        shape = base.decode(s.x_init).shape
    assert s.x0.shape == shape, f"{name}: samples of shape {tuple(s.x0.shape)}, not {tuple(shape)}"
    # Repeatable and independent of batch mates
    check_determinism(case, nfe)
    check_batch_invariance(case, nfe)
    # Neutral options change nothing
    if neutral is not None:
        plain = resolve_options("modifier", name, modifier.options, dict(neutral))
        modified = modifier.apply(CountingDenoiser(base), **plain)
        x = SampleNoise(SEED, range(3), modified.shape, "cpu")()
        with torch.inference_mode():
            for sigma in (base.sigma_max, 1.0, base.sigma_min * 10):
                a, b = modified(x * sigma, sigma), base(x * sigma, sigma)
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (
                    f"{name} with {dict(neutral)} changes the model's output at sigma {sigma:.3g}"
                )


# --- What a plugin's tests build on -----------------------------------------------------------


def run_records(config: RunConfig, registry: Any = None) -> list[dict[str, Any]]:
    """Run `config` (a `bench.RunConfig`) as `bench run` runs it, into `config.out`, and return
    the records of the cells it ran. For a run the command line cannot say (`metrics=[]`: no
    metric at all); `bench.run(...)` and `bench.cli.main([...])` run the rest."""
    from .runner import run

    return run(registry or installed(), config)[1]


def parse_command(argv: Sequence[str], registry: Any = None) -> Any:
    """`argv` as `bench`'s parser reads it, every plugin's commands included: the
    argparse.Namespace whose `func(registry, args)` runs the command (`bench.cli.main(argv)`
    parses and runs it in one go)."""
    from .cli import build_parser

    return build_parser(registry or installed()).parse_args(list(argv))


@contextlib.contextmanager
def console_width(width: int = 400) -> Iterator[None]:
    """While it is open, `bench.cli.main` prints its tables (`bench list`, `bench plugins`)
    `width` columns wide, so that a row is one line a test can read."""
    from .cli import _c

    before = _c.out.width
    _c.out.width = width
    try:
        yield
    finally:
        _c.out.width = before


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] as uint8 0..255, rounded as runs store samples and as `fid-digits`
    reads them."""
    from .metrics.digits_classifier import to_uint8 as convert

    return convert(x)


def digits_images() -> Tensor:
    """scikit-learn's 1797 handwritten digits, float32 [N, 1, 8, 8] in [-1, 1]: the data the
    digits models are fitted to."""
    from .metrics.digits_classifier import digits

    return digits()[0]


def digits_features(images: Tensor) -> Tensor:
    """The 64-d features of uint8 images [B, C, H, W] (H = W a multiple of 8) in the digits
    feature space (`digits-classifier-v1`), in which `fid-digits` and `kid-digits` compare."""
    from .metrics.digits_classifier import extract, load_net

    return extract(load_net(), images)


def digits_reference_features() -> Tensor:
    """The shipped features of all 1797 digits, the reference of `fid-digits` and `kid-digits`."""
    from .metrics.digits_classifier import reference_features

    return reference_features()
