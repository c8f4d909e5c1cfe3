"""Share of sampling wall-clock spent inside the network, as pytest-benchmark checks.

Skipped by the project's default options (`--benchmark-skip`); run them with

    pytest benchmarks/test_network_share.py --benchmark-only -s

CPU: every installed sampler at NFE 10 on the embedded digits UNet, batch 256: above 98%
of sampling wall-clock inside the network. GPU (when CUDA is available): the random-weight
throughput model (google/ddpm-cifar10-32's UNet) at batch 512: above 95%. The figures come
from `throughput.measure`, the real runner's timing.
"""

from __future__ import annotations

import pytest
import torch
from throughput import measure, table


def check_share(benchmark, target: float, **kw) -> None:
    rows = benchmark.pedantic(lambda: measure(**kw), rounds=1, iterations=1)
    print(f"\n{kw}\n{table(rows)}")
    ok = [r for r in rows if r.status == "ok"]
    assert ok, "no sampler ran"
    benchmark.extra_info.update(
        {r.sampler: {"images_per_s": r.images_per_s, "in_network": r.in_network} for r in ok}
    )
    low = [f"{r.sampler} {r.in_network:.1%}" for r in ok if r.in_network <= target]
    assert not low, f"below {target:.0%} of wall-clock inside the network: {', '.join(low)}"


def test_cpu_embedded_model(benchmark):
    check_share(benchmark, 0.98, model="digits", batch_size=256, num_samples=512)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_throughput_model(benchmark):
    check_share(
        benchmark,
        0.95,
        model="throughput-ddpm-cifar10",
        device="cuda",
        batch_size=512,
        num_samples=2048,
        dtype="bf16",
        channels_last=True,
    )
