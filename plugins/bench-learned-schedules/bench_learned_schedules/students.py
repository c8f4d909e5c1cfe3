"""The search solvers: first-party solvers written over tensor sigmas, so that a search can
differentiate a solve through its time steps (LD3) or take one step of its family (GITS).

Each `solve` is the same arithmetic as the registered sampler of that name (bench-classic's
euler, ipndm, dpm++2m, dpm++3m, unipc; the tests hold them to it), in the sigma formulation:
d = (x - D) / sigma, lambda = -log sigma, a step sigma_s -> sigma_t has h = log(sigma_s / sigma_t).
A final sigma of 0 is the denoise x = D(x, sigma).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.errors import UsageError
from bench.solvers import ADAMS_BASHFORTH, afs_d, dpmpp_step, to_d, unipc_coefficients

# The search solvers and the options of each that change its arithmetic
SOLVERS = {
    "euler": (),
    "ipndm": ("order",),
    "dpm++2m": ("lower_order_final",),
    "dpm++3m": ("lower_order_final", "d2"),
    "unipc": ("order", "variant", "lower_order_final"),
}
DATA_PREDICTION = ("dpm++2m", "dpm++3m", "unipc")  # exponential integrators on D; the rest step on d
DEFAULT_SOLVER = "ipndm"


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise UsageError(f"no search solver '{name}'; use one of {', '.join(SOLVERS)} (or solver=auto)")
    return name


def step_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """Order of step i of `steps`: warm-up, and optionally lower order on the last steps."""
    k = min(order, i + 1)
    return min(k, steps - i) if lower_order_final else k


def orders(solver: str, options, steps: int) -> list[int]:
    """Each step's order, as the solver takes them (the data-free objective's input)."""
    if solver == "euler":
        return [1] * steps
    if solver == "ipndm":
        return [min(int(options.get("order", 4)), i + 1) for i in range(steps)]
    order = {"dpm++2m": 2, "dpm++3m": 3}.get(solver, int(options.get("order", 3)))
    lof = bool(options.get("lower_order_final", True))
    return [step_order(order, i, steps, lof) for i in range(steps)]


def denoise(model, x: Tensor, sigma: Tensor, afs: bool) -> Tensor:
    """D(x, sigma), or the analytical first step's D = x - sigma x / sqrt(1 + sigma^2)."""
    return x - sigma * afs_d(x, sigma) if afs else model(x, sigma)


def one_step(solver: str, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The first-order step of the solver's family from (x, D) at sigma: Euler on d, or DDIM
    on D (DPM-Solver++ and UniPC at order 1)."""
    if solver in DATA_PREDICTION:
        return (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised
    return x + (sigma_next - sigma) * to_d(x, sigma, denoised)


def solve(model, x: Tensor, sigmas: Tensor, solver: str, options, afs: bool = False) -> Tensor:
    """The solver's whole solve along `sigmas` (a tensor, possibly requiring grad)."""
    return SOLVE[solver](model, x, sigmas, options, afs)


def _euler(model, x, s, options, afs):
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs and i == 0)
        x = denoised if s[i + 1] == 0 else x + (s[i + 1] - s[i]) * to_d(x, s[i], denoised)
    return x


def _ipndm(model, x, s, options, afs):
    """Adams-Bashforth with the equal-step coefficients on d, lower orders to warm up."""
    order, ds = int(options.get("order", 4)), []
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], afs and i == 0)
        ds = ([to_d(x, s[i], denoised)] + ds)[:order]
        if s[i + 1] == 0:
            x = denoised
        else:
            x = x + (s[i + 1] - s[i]) * sum(c * d for c, d in zip(ADAMS_BASHFORTH[len(ds)], ds, strict=True))
    return x


def _dpmpp(order):
    def run(model, x, s, options, afs):
        """DPM-Solver++(2M)/(3M): multistep in data prediction."""
        lof, d2, ms = bool(options.get("lower_order_final", True)), options.get("d2", "reference"), []
        for i in range(len(s) - 1):
            denoised = denoise(model, x, s[i], afs and i == 0)
            ms = (ms + [denoised])[-order:]
            if s[i + 1] == 0:
                x = denoised
            else:
                k = step_order(order, i, len(s) - 1, lof)
                x = dpmpp_step(x, s[i + 1], list(s[: i + 1][-k:]), ms[-k:], d2)
        return x

    return run


def unipc_update(x, sigma_t, sigmas, ms, variant, m_t=None):
    """UniP (m_t None) or UniC of order len(ms), data prediction (Zhao et al. 2023, Alg. 2-3),
    with tensor coefficients: h phi_1, B(h) and the order conditions R rho = b."""
    sigma_s0 = sigmas[-1]
    h = torch.log(sigma_s0 / sigma_t)
    rks = [torch.log(sigma_s0 / sigma_k) / h for sigma_k in reversed(sigmas[:-1])]
    D1s = [(m - ms[-1]) / r for m, r in zip(reversed(ms[:-1]), rks, strict=True)]
    h_phi_1, b_h, b = unipc_coefficients(h, len(rks) + 1, variant)
    r_all = torch.stack([*rks, torch.ones_like(h)])
    R = torch.stack([r_all**p for p in range(len(r_all))])
    b = torch.stack(b)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * ms[-1]
    if m_t is None and D1s:
        rhos = [0.5] if len(D1s) == 1 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_t = x_t - b_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s, strict=True))
    elif m_t is not None:
        rhos = [0.5] if not D1s else torch.linalg.solve(R, b)
        x_t = x_t - b_h * sum(rho * D1 for rho, D1 in zip(rhos, [*D1s, m_t - ms[-1]], strict=True))
    return x_t


def _unipc(model, x, s, options, afs):
    """UniPC: UniP predictor, UniC corrector on the next evaluation (none after the last)."""
    order, variant = int(options.get("order", 3)), options.get("variant", "bh2")
    lof, ms, x_last, k_last = bool(options.get("lower_order_final", True)), [], x, 0
    n = len(s) - 1
    for i in range(n):
        denoised = denoise(model, x, s[i], afs and i == 0)
        # Corrector for the step that landed here
        if k_last and s[i + 1] > 0:
            x = unipc_update(x_last, s[i], list(s[:i][-k_last:]), ms[-k_last:], variant, m_t=denoised)
        ms = (ms + [denoised])[-order:]
        # Predictor to the next point, or the denoise to 0
        if s[i + 1] == 0:
            x = denoised
        else:
            k_last = step_order(order, i, n, lof)
            x_last, x = x, unipc_update(x, s[i + 1], list(s[: i + 1][-k_last:]), ms[-k_last:], variant)
    return x


SOLVE = {"euler": _euler, "ipndm": _ipndm, "dpm++2m": _dpmpp(2), "dpm++3m": _dpmpp(3), "unipc": _unipc}
