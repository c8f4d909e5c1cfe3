"""FID (digits) of single cells on `digits`, for tuning a searched schedule: each argument
`sampler/nfe/schedule` is built as a run builds its cell (the search, if not cached, runs
first) and scored on the first N samples of seed block 0, with the search's own numbers.
`--top SIGMA` instead runs the sampler on a Karras schedule (rho 7) from SIGMA down to
sigma_min: how much a lower start alone is worth, with untuned steps.

    OMP_NUM_THREADS=1 python plugins/bench-learned-schedules/scripts/schedule_study.py \\
        unipc/5/ld3 unipc/5/ld3:start=search unipc/5/ld3:lr=0.05:epochs=8:samples=100
    OMP_NUM_THREADS=1 python plugins/bench-learned-schedules/scripts/schedule_study.py \\
        --top 80,20,10,5 dpm++2m/5/karras unipc/5/karras
"""

from __future__ import annotations

import argparse
import time

import torch

import bench
from bench import Batch, CellSpec, Method, MetricContext, Spec, build, load_model


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """steps + 1 sigmas from sigma_max down to sigma_min (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def fid(registry, model, sampler: str, nfe: int, schedule: str, n: int, top: float | None) -> str:
    """One cell's FID (digits) on n samples, and what its search did."""
    spec = CellSpec("digits", Method(Spec.parse(sampler), Spec.parse(schedule)), nfe, n, 0,
                    (("fid-digits", None),))
    start = time.perf_counter()
    solve = build(registry, spec, model, "cpu")
    fit_s = time.perf_counter() - start
    if top is not None:  # the same solver on a Karras schedule from a lower top
        solve.sigmas = karras(len(solve.sigmas) - 1, model.sigma_min, top)
    ctx = MetricContext("digits", model, n, 0, torch.device("cpu"), {}, {})
    state = registry.get("metrics", "fid-digits").create(ctx)
    for first in range(0, n, 600):
        s = solve.sample(range(first, min(n, first + 600)))
        state.update(Batch(x0=s.x0.float(), eps=s.eps, indices=s.indices, sigma_max=float(solve.sigmas[0]),
                           seeds=s.seeds))
    value = state.result()["fid_digits"]
    fitted = solve.record().get("schedule_fitted", {})
    loss = (f" loss {fitted['loss_initial']:.4g} -> {fitted['loss_learned']:.4g}"
            if "loss_learned" in fitted else "")
    where = f"{sampler} {nfe} {schedule}{f' top {top:g}' if top else ''}"
    return (f"{where}: FID {value.value:.3f} ± {value.std:.3f}"
            f"  search {fit_s:.0f} s, {solve.prep.get('schedule_fit_nfe', 0)} calls{loss}"
            f"  sigmas {' '.join(f'{float(x):.3g}' for x in solve.sigmas)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", help="sampler/nfe/schedule, e.g. unipc/5/ld3:start=search")
    parser.add_argument("--num-samples", type=int, default=1797)
    parser.add_argument("--top", default=None, help="comma list of start sigmas for a Karras schedule")
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = bench.registry()
    model = load_model("digits", "cpu", registry)
    tops = [float(t) for t in args.top.split(",")] if args.top else [None]
    for cell in args.cells:
        sampler, nfe, schedule = cell.split("/")
        for top in tops:
            print(fid(registry, model, sampler, int(nfe), schedule, args.num_samples, top), flush=True)


if __name__ == "__main__":
    main()
