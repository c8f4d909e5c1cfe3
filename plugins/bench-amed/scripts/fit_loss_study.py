"""Why the iPNDM plugin defaults to max_order 3 and the trajectory loss: RMSE to a fine
solve, unfitted and fitted with each `fit_loss`, for each `max_order`.

For each model the AMED-Plugin on iPNDM is fitted (default options otherwise, into a
temporary cache) and run on 300 samples from the run seeds 0..299; the reference is Heun
with 200 steps on the same karras schedule down to sigma_min, from the same noise.

    python plugins/bench-amed/scripts/fit_loss_study.py --model digits --nfe 5
    python plugins/bench-amed/scripts/fit_loss_study.py --model mixture --nfe 9
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_amed.prepare import prepare
from bench_amed.solvers import sample_amed

import bench
from bench.solvers import heun_step

NAME = "amed-plugin-ipndm"


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = bench.registry()
    model = bench.load_model(args.model, torch.device("cpu"), registry=registry)
    eps = bench.SampleNoise(0, range(300), model.shape, "cpu")()
    out = Path(tempfile.mkdtemp())
    fine = registry.get("schedules", "karras").sigmas(200, model.sigma_min, model.sigma_max, to_zero=False)
    ref = eps * fine[0]
    with torch.no_grad():
        for sigma, sigma_next in zip(fine[:-1].tolist(), fine[1:].tolist(), strict=True):
            ref = heun_step(model, ref, sigma, sigma_next)
    print(f"{NAME} on {args.model} at {args.nfe} NFE: RMSE to Heun (200 steps), 300 samples\n")
    print("| max_order | unfitted | fit_loss=step | fit_loss=trajectory |\n| ---: | ---: | ---: | ---: |")
    for order in (2, 3, 4):
        row = []
        for loss in (None, "step", "trajectory"):
            method = bench.Method(bench.Spec.parse(f"{NAME}:max_order={order}"))
            cell = bench.CellSpec(args.model, method, args.nfe)
            recipe = bench.resolve(registry, cell, model)  # options, plan, the karras sigmas to sigma_min
            options, sigmas = {**recipe.options, **({"fit_loss": loss} if loss else {})}, recipe.sigmas
            prepared = {}
            if loss is not None:
                prepared = prepare(
                    NAME, "ipndm", bench.CountingDenoiser(model), sigmas, options, force=True, out=out
                )
            with torch.inference_mode():
                x = sample_amed(model, eps * sigmas[0], sigmas, base="ipndm", **{**options, **prepared})
            row.append(f"{rmse(x, ref):.4f}")
        print(f"| {order} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
