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
from bench_classic.samplers import sample_heun
from bench_classic.schedules import karras

from bench import load_model
from bench.contracts import resolve_options
from bench.nfe import CountingDenoiser
from bench.plugins import load_registry
from bench.seeding import SampleNoise

NAME = "amed-plugin-ipndm"


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    registry = load_registry()
    model = load_model(args.model, torch.device("cpu"), registry=registry)
    sampler = registry.get("samplers", NAME)
    eps = SampleNoise(0, range(300), model.shape, "cpu")()
    out = Path(tempfile.mkdtemp())
    fine = karras(200, model.sigma_min, model.sigma_max, to_zero=False)
    with torch.no_grad():
        ref = sample_heun(model, eps * fine[0], fine)
    print(f"{NAME} on {args.model} at {args.nfe} NFE: RMSE to Heun (200 steps), 300 samples\n")
    print("| max_order | unfitted | fit_loss=step | fit_loss=trajectory |\n| ---: | ---: | ---: | ---: |")
    for order in (2, 3, 4):
        row = []
        for loss in (None, "step", "trajectory"):
            options = resolve_options("sampler", NAME, sampler.options, {"max_order": order})
            plan = sampler.plan(args.nfe, options)
            options = {**options, **plan.options, **({"fit_loss": loss} if loss else {})}
            sigmas = karras(plan.steps, model.sigma_min, model.sigma_max, to_zero=False)
            prepared = {}
            if loss is not None:
                prepared = prepare(
                    NAME, "ipndm", CountingDenoiser(model), sigmas, options, force=True, out=out
                )
            with torch.inference_mode():
                x = sample_amed(model, eps * sigmas[0], sigmas, base="ipndm", **{**options, **prepared})
            row.append(f"{rmse(x, ref):.4f}")
        print(f"| {order} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
