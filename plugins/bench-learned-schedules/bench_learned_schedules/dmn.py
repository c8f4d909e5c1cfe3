"""DMN (Xue et al., CVPR 2024, "Accelerating Diffusion Sampling with Optimized Time Steps";
scxue/DM-NonUniform): data-free time steps for a multistep data-prediction solver.

In lambda = -log sigma the exact step is x_t / sigma_t = x_s / sigma_s + int e^lambda
x0(lambda) d lambda (on the VP axis); a multistep solver of order k replaces x0 by the
Lagrange polynomial through its last k data predictions, so step s weighs prediction j with
J_j = int_{lambda_s}^{lambda_(s+1)} e^lambda l_j(lambda) d lambda. Modelling the error of
prediction j as e_j = sigma_vp,j^p / alpha_j (p = `err_power`; the reference: 2, "1 better
for pixel-space models"), the objective is the reference's bound

    sum over order-1 steps |e_j J_j|
    + sum over the first `trunc` higher-order steps sqrt(sum_j (e_j J_j)^2)
    + sum_j | sum over the later steps of e_j J_j |

(errors of early steps add in quadrature, of later ones coherently; trunc = 3 at <= 7
steps, else 0, as the reference). The step orders are the search solver's own (warm-up,
lower order final). No network call: the steps depend on the model's sigma range only.
They are softmax increments in lambda (as LD3's), started at uniform log-SNR, and L-BFGS
minimises the objective.

`start` = `sigma_max` (the default) or a number in (sigma_min, sigma_max] fixes the first
sigma, and the bound is minimised over the steps below it. `start=search` is refused: the
bound has no term for the prior's mismatch at a lower start, so it would only fall as the
start falls (use ld3:start=search, whose teacher distance has that term).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from bench.errors import UsageError

from .ld3 import canonical_start, schedule, start_of
from .students import orders


@dataclass(frozen=True)
class DMNOptions:
    """How DMN optimises; every field is part of the cache key."""

    err_power: float = 1.0
    trunc: int = -1  # -1: 3 at <= 7 steps, else 0 (the reference's truncNum)
    iters: int = 300
    start: str = "sigma_max"  # or a number: the first sigma (not searched: module docstring)

    def __post_init__(self) -> None:
        if not self.err_power > 0 or self.iters < 1 or self.trunc < -1:
            raise UsageError("dmn needs err_power > 0, iters >= 1 and trunc >= -1")
        if str(self.start).strip() == "search":
            raise UsageError(
                "dmn start=search is not offered: its data-free bound has no prior-mismatch term "
                "(it would only fall with the start); give start=sigma_max or a number, "
                "or use ld3:start=search"
            )
        object.__setattr__(self, "start", canonical_start(self.start, "dmn", ("sigma_max",)))

    def to_json(self) -> dict:
        """The key's fields; start only where it is not sigma_max (the keys, and committed
        fits, of the searches before the option existed)."""
        out = asdict(self)
        if self.start == "sigma_max":
            del out["start"]
        return out


def h_integrals(h: Tensor, k: int) -> Tensor:
    """[int_0^h e^u u^p du for p < k]: H_0 = e^h - 1, H_p = e^h h^p - p H_(p-1)."""
    out = [torch.expm1(h)]
    for p in range(1, k):
        out.append(torch.exp(h) * h**p - p * out[-1])
    return torch.stack(out)


def weights(lam: Tensor, s: int, k: int) -> Tensor:
    """J_j of step s of order k, j over the points s - k + 1 .. s: the Lagrange basis through
    them integrated against e^lambda over [lambda_s, lambda_(s+1)]."""
    u = lam[s - k + 1 : s + 1] - lam[s]  # nodes relative to the step's start
    V = torch.stack([u**p for p in range(k)], dim=1)  # V[m, p] = u_m^p
    A = torch.linalg.solve(V, torch.eye(k, dtype=lam.dtype))  # the basis' monomial coefficients
    return torch.exp(lam[s]) * (A.T @ h_integrals(lam[s + 1] - lam[s], k))


def objective(sigmas: Tensor, step_orders: list[int], err_power: float, trunc: int) -> Tensor:
    """The reference's error bound for the schedule `sigmas` (decreasing, no final 0)."""
    lam = -torch.log(sigmas)
    alpha = 1 / torch.sqrt(1 + sigmas**2)
    err = (sigmas * alpha) ** err_power / alpha
    n = len(sigmas) - 1
    trunc = (3 if n <= 7 else 0) if trunc < 0 else trunc
    res, coherent = sigmas.new_zeros(()), sigmas.new_zeros(n + 1)
    for s, k in enumerate(step_orders):
        terms = err[s - k + 1 : s + 1] * weights(lam, s, k)
        if k == 1:
            res = res + terms.abs().sum()
        elif s < trunc:
            res = res + terms.pow(2).sum().sqrt()
        else:
            coherent = coherent.index_add(0, torch.arange(s - k + 1, s + 1), terms)
    return res + coherent.abs().sum()


def search(
    n: int, sigma_min: float, sigma_max: float, solver: str, solver_options, options: DMNOptions
) -> tuple[list[float], dict]:
    """DMN's n + 1 sigmas for the search solver's step orders, and the optimisation's statistics."""
    step_orders = [min(k, 3) for k in orders(solver, solver_options, n)]
    sigma_max = start_of(options.start, sigma_min, sigma_max, "dmn")
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    f = lambda t: objective(
        schedule(t, sigma_min, sigma_max),
        step_orders,
        options.err_power,  # noqa: E731
        options.trunc,
    )
    start = float(f(theta.detach()))
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=options.iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = f(theta)
        value.backward()
        return value

    opt.step(closure)
    end = float(f(theta.detach()))
    best = theta.detach() if math.isfinite(end) and end <= start else torch.zeros(n, dtype=torch.float64)
    sigmas = schedule(best, sigma_min, sigma_max)
    return [float(s) for s in sigmas], {
        "objective_logsnr": start,
        "objective": min(start, end),
        "orders": step_orders,
    }
