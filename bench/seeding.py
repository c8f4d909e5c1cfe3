"""Per-sample noise: sample i draws every random number from its own stream, seeded
with seed + i, so a sample does not depend on batch size, device count or which other
samplers ran, and every sampler in a run starts from the same noise.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SampleNoise:
    """Standard normal draws for a batch of sample indices, one CPU generator per sample.

    The first call gives the initial latent eps (x = sigma_max * eps); later calls give the
    per-step noise of stochastic samplers. Draws happen on the CPU in float32 and move to
    `device`, so results agree across devices and batch sizes.
    """

    def __init__(self, seed: int, indices: Tensor | list[int], shape, device) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(int(seed) + int(i)) for i in self.indices]

    def __call__(self) -> Tensor:
        draws = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)
