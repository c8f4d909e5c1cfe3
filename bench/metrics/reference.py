"""The reference error: each sample against a converged solve of its own ODE from its own noise.

`reference` scores any model, with no data and no feature network: sample i of a cell
starts from x_T = sigma_max * eps_i; its reference is the probability-flow ODE solved from
that same x_T to the protocol's endpoint sigma_min (README, Protocol) by a converged
solver, decoded like the samples. The values are the mean over samples of the per-sample
RMSE (`reference_rmse`) and PSNR (`reference_psnr`, peak-to-peak 2 for images in [-1, 1]),
each with its plain standard error s / sqrt(n) (exact for a mean) and replicates for the
paired bootstrap (`bench.stats`). For a stochastic sampler the reference is still the ODE's
endpoint from the same initial noise, so the number is a distance to it, not a
convergence error. The ODE is the model's own, guided where the cell is (a `target`
modifier such as cfg: `bench.cell.target_model`); a cell that denoises to zero
(`terminal: to zero`) differs from the endpoint by about sigma_min.

Solver (the metric option `reference_solver`): `heun`, EDM's deterministic Heun sampler
(Karras et al. 2022, Algorithm 1, S_churn = 0) on a Karras schedule (rho = 7) of N steps from
the cell's first sigma to the model's sigma_min, 2N network calls a sample; `rk4`, classical
Runge-Kutta in log sigma over N steps, 4N calls a sample, the analytic models' high-accuracy
reference; `exact`, the closed-form ODE solution of a model that has one (the single
Gaussian). The default `auto` takes exact where it exists, rk4 for the analytic models
(float64 denoisers with known moments), heun for networks. The solve runs in the network's
own dtype (float32 for a float32 network; an analytic model computes in float64). N is the
metric option `reference_steps` (default 128). Its own error is checked once per model: the
first CHECK samples are solved again with 2N steps, and `gap` (mean per-sample RMSE between
the two) is recorded; for a second-order solver the N-step error is about 4/3 of it (an
exact reference has none).

Cache: the reference of a batch (its seeds and cell positions: a conditional model's
labels may depend on either) is solved once per key -- format, solver, steps, sigma range,
the model spec, a fingerprint of the model's describe() and every weight, the network's
dtype and the device type -- kept in the run's memory and on disk in
$BENCH_CACHE/reference/<key>-<batch>.safetensors (written atomically). A file is used only
when its stored key, seeds and positions equal the wanted ones and its values are finite
with the samples' shape; anything else is solved again and overwritten. A run with another
--batch-size solves again. The solve calls the model without the NFE counter, so no cell's
budget pays for it; its seconds are the cell's `metric_info.reference.reference_s`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..cell import digest
from ..contracts import Batch, Denoiser, Metric, MetricContext, Value
from ..errors import UsageError
from ..files import cache_dir as store_cache_dir
from ..files import fingerprint
from ..models.analytic import GaussianMixture
from ..solvers import heun_step
from ..stats import Bootstrapped, bootstrap_b, counts

FORMAT = 2  # 2: the solve is bench.solvers.heun_step (round-off differs from 1)
DEFAULT_STEPS = 128  # Heun steps of the reference solve (2 calls each)
RHO = 7.0  # Karras et al.'s schedule exponent
CHECK = 8  # samples solved again at 2N steps, once per model, for the reference's own error
PEAK = 2.0  # peak-to-peak range of images in [-1, 1], for PSNR
TINY = 1e-12  # RMSE floor in the PSNR, so a sample equal to its reference is finite


# The README's main job's solves (`digits`, n=256, seed block 0, CPU, float32), shipped so
# that its first run solves nothing; read only, and only where their key matches exactly
SHIPPED = Path(__file__).parents[1] / "assets" / "reference"


def cache_dir() -> Path:
    """$BENCH_CACHE/reference, or ~/.cache/sampler-bench/reference."""
    return store_cache_dir("reference")


def stored(filename: str) -> list[Path]:
    """Where a stored solve may be: the cache (written), then the package's (read only)."""
    return [cache_dir() / filename, SHIPPED / filename]


def network_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (else buffer); float64 for a model
    with neither (an analytic one)."""
    tensors = chain(model.parameters(), model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float64)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> list[float]:
    """n + 1 sigmas from sigma_max down to sigma_min (Karras et al. 2022, eq. 5), float64."""
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, sigmas: list[float]) -> Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0)
    over positive `sigmas` (bench.solvers.heun_step): 2 calls a step, in x's dtype."""
    model = lambda x_, sigma: denoiser(x_, sigma).to(x_.dtype)  # noqa: E731
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = heun_step(model, x, sigma_cur, sigma_next)
    return x


@torch.no_grad()
def reference_solve(
    denoiser: Denoiser,
    x: Tensor,
    sigma_from: float,
    sigma_to: float = 0.0,
    steps: int = 256,
    sigma_tiny: float = 1e-6,
) -> Tensor:
    """Probability-flow ODE solution by classical RK4 in s = log(sigma), the state in float64.

    dx/ds = x - D(x, e^s). For sigma_to = 0 it integrates down to `sigma_tiny` and takes
    the final denoise there, whose error is O(sigma_tiny^2). The network sees its own dtype
    (a float32 network gets float32 inputs; an analytic model computes in float64).
    """
    dtype = network_dtype(denoiser)
    D = lambda x_, sigma: denoiser(x_.to(dtype), sigma).double()  # noqa: E731
    d = lambda x_, s: x_ - D(x_, math.exp(s))  # noqa: E731
    end = sigma_to if sigma_to > 0 else sigma_tiny
    x = x.double()
    s, h = math.log(sigma_from), (math.log(end) - math.log(sigma_from)) / steps
    for _ in range(steps):
        # One classical Runge-Kutta step of size h in log-sigma
        k1 = d(x, s)
        k2 = d(x + h / 2 * k1, s + h / 2)
        k3 = d(x + h / 2 * k2, s + h / 2)
        k4 = d(x + h * k3, s + h)
        x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return D(x, end) if sigma_to == 0 else x




def per_sample_rmse(a: Tensor, b: Tensor) -> Tensor:
    """RMSE of each row of a against b, float64 on the CPU."""
    diff = a.detach().double().cpu() - b.detach().double().cpu()
    return diff.reshape(len(diff), -1).pow(2).mean(1).sqrt()


SOLVERS = ("auto", "heun", "rk4", "exact")
SCHEDULES = {"heun": f"karras rho={RHO:g}", "rk4": "uniform in log sigma", "exact": "closed form"}


def reference_solver(options: Mapping[str, Any], model: Denoiser) -> str:
    """The solver the metric option `reference_solver` names, `auto` resolved for the model."""
    wanted = str(options.get("reference_solver", "auto")) if options else "auto"
    if wanted not in SOLVERS:
        raise UsageError(f"metric option reference_solver={wanted!r}: give one of {', '.join(SOLVERS)}")
    closed = isinstance(model, GaussianMixture) and len(model.mu) == 1  # a wrapper's ODE is its own
    if wanted == "exact" and not closed:
        raise UsageError("metric option reference_solver=exact: the model's ODE has no closed-form "
                         "solution here; use rk4 or heun")
    if wanted != "auto":
        return wanted
    analytic = network_dtype(model) == torch.float64 and model.moments is not None
    return "exact" if closed else "rk4" if analytic else "heun"


class References:
    """One model's reference solves for one first sigma: memory, disk, and the solver itself."""

    def __init__(self, ctx: MetricContext, sigma_max: float, steps: int) -> None:
        model = ctx.denoiser
        self.ctx, self.model, self.steps = ctx, model, steps
        self.dtype = network_dtype(model)
        self.solver = reference_solver(ctx.options, model)
        self.sigmas = karras(steps, float(model.sigma_min), float(sigma_max))
        memo = ("reference-fingerprint", id(model))  # hashing every weight once per run
        fp = ctx.cache.get(memo)
        if fp is None:
            fp = ctx.cache[memo] = fingerprint(model)
        self.key = {
            "format": FORMAT,
            "solver": self.solver,
            "schedule": SCHEDULES[self.solver],
            "steps": 0 if self.solver == "exact" else steps,
            "sigma_max": float(sigma_max),
            "sigma_min": float(model.sigma_min),
            "model": ctx.model,
            "fingerprint": fp,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": ctx.device.type,
        }
        self.name = digest(self.key)[:16]

    def solve(self, eps: Tensor, indices: Tensor, steps: int | None = None) -> Tensor:
        """The decoded ODE solutions of a batch from x_T = sigma_max * eps."""
        sigmas = self.sigmas if steps is None else karras(steps, self.sigmas[-1], self.sigmas[0])
        x = eps.to(self.ctx.device, self.dtype) * sigmas[0]
        with torch.no_grad():
            self.model.select(indices)  # the batch's conditioning, as its cell had it
            if self.solver == "exact":
                x = self.model.ode_solution(x, sigmas[0], sigmas[-1])
            elif self.solver == "rk4":
                x = reference_solve(self.model, x, sigmas[0], sigmas[-1], steps or self.steps).to(self.dtype)
            else:
                x = heun(self.model, x, sigmas)
            return self.model.decode(x).detach().cpu()

    def get(self, batch: Batch, seeds: Tensor) -> tuple[Tensor, bool, float]:
        """The batch's references, whether they were solved here (else cached) and the seconds
        spent on them (solve, own-error check, file read)."""
        name = f"{self.name}-{digest([seeds.tolist(), batch.indices.tolist()])[:16]}"
        memo = ("reference", name)
        if memo in self.ctx.cache:
            return self.ctx.cache[memo], False, 0.0
        start = time.perf_counter()
        found = (self._read(p, seeds, batch.indices, batch.x0.shape) for p in stored(f"{name}.safetensors"))
        ref = next((r for r in found if r is not None), None)
        solved = ref is None
        if solved:
            ref = self.solve(batch.eps, batch.indices)
            self._write(cache_dir() / f"{name}.safetensors", ref, seeds, batch.indices)
        self._check(batch, ref)
        self.ctx.cache[memo] = ref
        return ref, solved, time.perf_counter() - start

    def _read(self, path: Path, seeds: Tensor, indices: Tensor, like: torch.Size) -> Tensor | None:
        """A stored reference, if it is exactly the one wanted; else None."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                same_key = json.loads((f.metadata() or {}).get("key", "null")) == self.key
                got = {k: f.get_tensor(k) for k in ("x0", "seeds", "indices")} if same_key else None
        except Exception:  # missing, truncated or not safetensors: solved again
            return None
        if got is None or not torch.equal(got["seeds"], seeds.cpu().long()):
            return None
        if not torch.equal(got["indices"], indices.cpu().long()) or got["x0"].shape != like:
            return None
        return got["x0"] if bool(torch.isfinite(got["x0"]).all()) else None

    def _write(self, path: Path, ref: Tensor, seeds: Tensor, indices: Tensor) -> None:
        from safetensors.torch import save

        from ..files import atomic_write

        tensors = {"x0": ref.contiguous(), "seeds": seeds.cpu().long(), "indices": indices.cpu().long()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save(tensors, metadata={"key": json.dumps(self.key, sort_keys=True)}))

    def check(self) -> dict[str, Any] | None:
        """The reference's own error, once measured for this key (memory, then disk)."""
        memo = ("reference-check", self.name)
        if memo not in self.ctx.cache:
            self.ctx.cache[memo] = None
            for path in stored(f"{self.name}.json"):
                try:
                    found = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                ok = isinstance(found, dict) and found.get("key") == self.key
                if ok and all(math.isfinite(found.get(k, math.nan)) for k in ("gap", "gap_max")):
                    self.ctx.cache[memo] = {k: v for k, v in found.items() if k != "key"}
                    break
        return self.ctx.cache[memo]

    def _check(self, batch: Batch, ref: Tensor) -> None:
        """Once per key: the first CHECK samples at 2N steps against their N-step solves."""
        if self.check() is not None:
            return
        from ..files import atomic_write

        k = min(CHECK, len(ref))
        start = time.perf_counter()
        if self.solver == "exact":  # a closed form has no discretisation error
            found = {"check_n": 0, "check_steps": 0, "gap": 0.0, "gap_max": 0.0, "check_s": 0.0}
        else:
            fine = self.solve(batch.eps[:k], batch.indices[:k], 2 * self.steps)
            gap = per_sample_rmse(ref[:k], fine)
            found = {"check_n": k, "check_steps": 2 * self.steps, "gap": float(gap.mean()),
                     "gap_max": float(gap.max()), "check_s": time.perf_counter() - start}
        self.ctx.cache[("reference-check", self.name)] = found
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir() / f"{self.name}.json", json.dumps({"key": self.key, **found}, indent=1))


def reference_steps(options: Mapping[str, Any]) -> int:
    """N from the metric option `reference_steps` (default DEFAULT_STEPS)."""
    raw = options.get("reference_steps", DEFAULT_STEPS) if options else DEFAULT_STEPS
    try:
        steps = int(raw)
    except (TypeError, ValueError):
        steps = 0
    if steps < 1:
        raise UsageError(f"metric option reference_steps={raw!r}: give a positive number of Heun steps")
    return steps


class ReferenceError(Bootstrapped):
    """RMSE and PSNR of each sample to its reference solve; the means, their plain standard
    errors, and replicates as count-weighted means of the per-sample values."""

    def __init__(self, ctx: MetricContext) -> None:
        self.ctx, self.steps = ctx, reference_steps(ctx.options)
        self.rmse: list[Tensor] = []
        self.refs: References | None = None
        self.bootstrap_b = bootstrap_b(ctx.options)
        self.seconds, self.solved, self.cached = 0.0, 0, 0

    def update(self, batch: Batch) -> None:
        shape = tuple(batch.eps.shape[1:])
        if shape != tuple(self.ctx.denoiser.shape):
            raise ValueError(f"metric 'reference': samples drawn at {shape} but the model's ODE is at "
                             f"{tuple(self.ctx.denoiser.shape)}; it needs the model's own resolution")
        if self.refs is None:
            self.refs = References(self.ctx, batch.sigma_max, self.steps)
        seeds = batch.seeds if batch.seeds is not None else batch.indices + self.ctx.seed
        ref, solved, seconds = self.refs.get(batch, torch.as_tensor(seeds).long())
        self.seconds += seconds
        if solved:
            self.solved += len(ref)
        else:
            self.cached += len(ref)
        self.rmse.append(per_sample_rmse(batch.x0, ref))

    def _count(self) -> int:
        return sum(len(r) for r in self.rmse)

    def _values(self) -> dict[str, Tensor]:
        r = torch.cat(self.rmse)
        return {"reference_rmse": r, "reference_psnr": 20 * torch.log10(PEAK / r.clamp(min=TINY))}

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        values = {k: v.numpy() for k, v in self._values().items()}
        w = counts(index_sets, self._count())
        return {k: w @ v / len(v) for k, v in values.items()}

    def result(self) -> Mapping[str, Value]:
        out = {}
        for key, v in self._values().items():
            se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else None
            psnr = key.endswith("psnr")
            title = "PSNR to reference (dB)" if psnr else "RMSE to reference"
            out[key] = Value(float(v.mean()), higher_is_better=psnr, std=se, n=len(v), title=title)
        return out

    def info(self) -> dict[str, Any]:
        """What the record says of the reference: its solver, key, cost here and own error."""
        refs = self.refs
        if refs is None:
            return {}
        calls = {"heun": 2 * self.steps, "rk4": 4 * self.steps, "exact": 0}[refs.solver]
        steps = "" if refs.solver == "exact" else f", {self.steps} steps ({calls} calls a sample)"
        return {"solver": f"{refs.solver}, {refs.key['schedule']}{steps}, sigma {refs.sigmas[0]:g} -> "
                          f"{refs.sigmas[-1]:g}, {refs.key['dtype']}",
                "key": refs.name, "solved": self.solved, "cached": self.cached,
                "reference_s": self.seconds, **(refs.check() or {})}


def reference_applies(ctx: MetricContext) -> str | None:
    """Any model; only a bad `reference_steps` or `reference_solver` stops it."""
    try:
        reference_steps(ctx.options)
        reference_solver(ctx.options, ctx.denoiser)
    except UsageError as exc:
        return str(exc)
    return None


METRIC = Metric(
    "reference",
    ReferenceError,
    "RMSE and PSNR of each sample to a converged solve of the model's ODE from the same noise "
    "(any model; the default where a model has no metric of its own)",
    applies=reference_applies,
    options={"reference_steps": DEFAULT_STEPS, "reference_solver": "auto"},
    aliases=("rmse",),  # the analytic models' RK4 reference of 0.2, now reference_solver=rk4
    deterministic_only=True,  # a stochastic sampler's distance to the ODE solution is no error of it
    answers="closest to the model's own ODE",
)
