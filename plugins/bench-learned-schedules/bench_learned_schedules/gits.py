"""GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling";
zju-pi/diff-sampler, gits-main): time steps by dynamic programming on a teacher trajectory.

1. Candidate sigmas: a fine polynomial grid (rho = 7) of `grid` points from sigma_max to
   sigma_min; a teacher (iPNDM, order 4, on the grid refined `teacher_sub` times) solves from
   `warmup` noises and keeps x and D at every candidate.
2. Cost matrix: c[i, j] = E || step_i->j(x_i, D_i) - x_j || for j > i, the local error of one
   first-order step of the search solver's family (Euler on d, or DDIM on D) from the
   teacher's point i to its point j, with the teacher's D_i (no further network calls).
3. Dynamic programming: the path 0 = p_0 < p_1 < ... < p_n = grid - 1 with exactly n steps
   minimising sum_m coeff^m c[p_m, p_(m+1)] (the reference's recursion
   V_k(i) = min_j c[i, j] + coeff V_(k-1)(j); coeff > 1 weighs later steps more).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from bench.errors import UsageError
from bench.solvers import ADAMS_BASHFORTH, to_d

from .students import one_step

METRICS = ("l2", "l1")


@dataclass(frozen=True)
class GitsOptions:
    """How GITS searches; every field is part of the cache key."""

    grid: int = 61  # candidate sigmas (the reference's num_steps_tea)
    teacher_sub: int = 2  # teacher steps per candidate interval
    warmup: int = 256  # teacher trajectories (the reference's num_warmup)
    batch: int = 256
    coeff: float = 1.15
    metric: str = "l2"
    seed: int = 20240917  # apart from run seeds

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"gits metric must be one of {', '.join(METRICS)}; got '{self.metric}'")
        if self.grid < 3 or min(self.teacher_sub, self.warmup, self.batch) < 1 or not self.coeff > 0:
            raise UsageError("gits needs grid >= 3, teacher_sub, warmup, batch >= 1 and coeff > 0")

    def to_json(self) -> dict:
        return asdict(self)


def polynomial(points: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """`points` sigmas uniform in sigma^(1/rho), sigma_max first (double precision)."""
    ramp = torch.linspace(0, 1, points, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def teacher(model, x: Tensor, grid: Tensor, sub: int) -> tuple[list[Tensor], list[Tensor]]:
    """iPNDM (order 4) on the grid refined `sub` times: x and D at every candidate sigma
    (D at the last, sigma_min, is not needed and not computed)."""
    fine = [float(s) for s in polynomial((len(grid) - 1) * sub + 1, float(grid[-1]), float(grid[0]))]
    xs, Ds, ds = [x], [], []
    with torch.no_grad():
        for i in range(len(fine) - 1):
            denoised = model(x, fine[i])
            if i % sub == 0:
                Ds.append(denoised)
            ds = ([to_d(x, fine[i], denoised)] + ds)[:4]
            x = x + (fine[i + 1] - fine[i]) * sum(
                c * d for c, d in zip(ADAMS_BASHFORTH[len(ds)], ds, strict=True)
            )
            if (i + 1) % sub == 0:
                xs.append(x)
    return xs, Ds


def cost_matrix(xs: list[Tensor], Ds: list[Tensor], grid: Tensor, solver: str, metric: str) -> Tensor:
    """c[i, j]: mean distance of one step i -> j from the teacher's point j (inf for j <= i)."""
    g = len(grid)
    cost = torch.full((g, g), math.inf, dtype=torch.float64)
    p = 2 if metric == "l2" else 1
    s = [float(v) for v in grid]
    for i in range(g - 1):
        for j in range(i + 1, g):
            x_next = one_step(solver, xs[i], Ds[i], s[i], s[j])
            cost[i, j] = (x_next - xs[j]).flatten(1).norm(p=p, dim=1).double().mean().cpu()
    return cost


def dp(cost: np.ndarray | Tensor, steps: int, coeff: float = 1.0) -> list[int]:
    """The path 0 -> g - 1 of exactly `steps` edges minimising sum_m coeff^m cost[p_m, p_(m+1)]."""
    c = np.asarray(cost, dtype=np.float64)
    g = len(c)
    if not 1 <= steps <= g - 1:
        raise UsageError(f"gits: {steps} steps need a grid of more than {steps} points; raise grid")
    # V[k, i]: the cheapest k-edge path from i to the end; nxt: its first hop
    V = np.full((steps + 1, g), math.inf)
    nxt = np.zeros((steps + 1, g), dtype=int)
    V[0, g - 1] = 0.0
    for k in range(1, steps + 1):
        for i in range(g - 1):
            total = c[i, i + 1 :] + coeff * V[k - 1, i + 1 :]
            j = int(np.argmin(total))
            V[k, i], nxt[k, i] = total[j], i + 1 + j
    # Follow the first hops from the start
    path = [0]
    for k in range(steps, 0, -1):
        path.append(int(nxt[k, path[-1]]))
    return path


def path_cost(cost, path: list[int], coeff: float = 1.0) -> float:
    """The DP's objective for one path."""
    c = np.asarray(cost, dtype=np.float64)
    return float(sum(coeff**m * c[a, b] for m, (a, b) in enumerate(zip(path, path[1:], strict=False))))


def search(
    model,
    n: int,
    sigma_min: float,
    sigma_max: float,
    solver: str,
    solver_options,
    options: GitsOptions,
    device,
) -> tuple[list[float], dict]:
    """GITS's n + 1 sigmas for the search solver, and the search's statistics."""
    grid = polynomial(options.grid, sigma_min, sigma_max)
    gen = torch.Generator().manual_seed(options.seed)
    cost, rounds = torch.zeros(options.grid, options.grid, dtype=torch.float64), 0
    # Teacher trajectories batch by batch, their cost matrices averaged
    for start in range(0, options.warmup, options.batch):
        size = min(options.batch, options.warmup - start)
        x_T = torch.randn(size, *model.shape, generator=gen).to(device) * sigma_max
        xs, Ds = teacher(model, x_T, grid, options.teacher_sub)
        cost += cost_matrix(xs, Ds, grid, solver, options.metric)
        rounds += 1
    cost /= rounds
    path = dp(cost.numpy(), n, options.coeff)
    default = [round(k * (options.grid - 1) / n) for k in range(n + 1)]  # the polynomial schedule
    stats = {
        "path": path,
        "dp_cost": path_cost(cost, path, options.coeff),
        "polynomial_cost": path_cost(cost, default, options.coeff),
    }
    return [float(grid[k]) for k in path], stats


def calls(options: GitsOptions) -> list[tuple[int, int]]:
    """(network calls, batch size) the search makes: the teacher's steps, batch by batch."""
    sizes = [min(options.batch, options.warmup - s) for s in range(0, options.warmup, options.batch)]
    return [((options.grid - 1) * options.teacher_sub, b) for b in sizes]
