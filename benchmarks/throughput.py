"""Throughput: images per second and the share of wall-clock inside the network, for each
sampler at NFE 10 (or its next feasible budget), through the real runner.

    python benchmarks/throughput.py --model digits --batch-size 256 --num-samples 1024
    python benchmarks/throughput.py --model throughput-ddpm-cifar10 --device cuda \\
        --batch-size 512 --num-samples 4096 --dtype bf16 --channels-last --compile

Every sampler runs `bench run`'s cells (per-sample noise, the NFE counter, CUDA-synchronised
timing) with no metrics: images/s = samples / wall_s of sampling, in network = model_s /
wall_s, where model_s sums the time inside each network call. Targets: above 98% on the
CPU with the embedded model, above 95% on a GPU at batch 512 (the overhead is the
sampler's own arithmetic and Python). `throughput-ddpm-cifar10` has random weights: its
samples are noise, only its speed means anything. `benchmarks/test_network_share.py`
turns the targets into pytest-benchmark checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bench
from bench import DEFAULT_MODEL, CellSpec, Method, RunConfig, Spec
from bench.errors import Infeasible
from bench.testing import run_records

NFE = 10


@dataclass
class Row:
    sampler: str
    nfe: int
    status: str
    images_per_s: float | None = None
    in_network: float | None = None
    wall_s: float | None = None
    reason: str | None = None


def budget(registry, text: str, nfe: int) -> int:
    """`nfe`, or the sampler's next feasible budget (`text` is name[:key=value...])."""
    method = Method(Spec.parse(text))
    for candidate in range(nfe, nfe + 4):
        try:
            bench.resolve(registry, CellSpec("any", method, candidate))  # options, then the plan
            return candidate
        except Infeasible:
            continue
    return nfe


def measure(
    model: str = DEFAULT_MODEL,
    samplers: list[str] | None = None,
    nfe: int = NFE,
    batch_size: int = 256,
    num_samples: int = 1024,
    device: str = "cpu",
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> list[Row]:
    """One row per sampler: its cell at `nfe` (or the next feasible budget), no metrics."""
    registry = bench.registry()
    names = samplers or registry.names("samplers")
    by_budget: dict[int, list[str]] = {}
    for name in names:
        by_budget.setdefault(budget(registry, name, nfe), []).append(name)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for n, group in by_budget.items():
            # One run per budget; num_samples a multiple of the batch, so every batch is alike
            config = RunConfig(
                models=[model],
                methods=[Method(Spec.parse(s)) for s in group],
                nfe=[n],
                num_samples=num_samples,
                batch_size=batch_size,
                device=device,
                metrics=[],
                out=Path(tmp) / f"nfe{n}",
                dtype=dtype,
                channels_last=channels_last,
                compile=compile,
            )
            for r in run_records(config, registry):  # metrics=[]: no metric, which bench.run always has
                rows[r["sampler"]] = row(r)
    return [rows[name] for name in names]


def row(record: dict) -> Row:
    if record["status"] != "ok":
        return Row(record["sampler"], record["nfe"], record["status"], reason=record.get("reason"))
    wall = record["wall_s"]
    return Row(
        record["sampler"], record["nfe"], "ok", record["num_samples"] / wall, record["model_s"] / wall, wall
    )


def table(rows: list[Row]) -> str:
    lines = [f"{'sampler':<22}{'NFE':>5}{'images/s':>12}{'in network':>12}"]
    for r in rows:
        if r.status == "ok":
            lines.append(f"{r.sampler:<22}{r.nfe:>5}{r.images_per_s:>12.4g}{r.in_network:>12.2%}")
        else:
            lines.append(f"{r.sampler:<22}{r.nfe:>5}  {r.status}: {r.reason}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--samplers", default="all", help="comma list, or all")
    parser.add_argument("--nfe", type=int, default=NFE)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    samplers = None if args.samplers == "all" else [s.strip() for s in args.samplers.split(",") if s.strip()]
    rows = measure(
        args.model,
        samplers,
        args.nfe,
        args.batch_size,
        args.num_samples,
        args.device,
        args.dtype,
        args.channels_last,
        args.compile,
    )
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"model {args.model} on {args.device} ({where}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), {args.dtype}, channels_last={args.channels_last}, "
        f"compile={args.compile}, batch {args.batch_size}, {args.num_samples} samples per sampler"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
