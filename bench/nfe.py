"""NFE counting: the harness, not the sampler, counts network evaluations.

One call of the wrapped denoiser on a batch is one NFE. The counter sits directly on the
model, under any modifiers, so extra network calls a modifier makes are counted too.
Calls at `count_shape` (the sampling resolution, which the runner sets after modifiers)
spend the budget; calls at another resolution are tallied apart as `extra`, and as
`extra_cost` in budget calls (pixels relative to count_shape, the FLOP ratio of a
convolutional network). A call on k times the batch (`batch`, which the cell sets: a
guidance modifier's conditional and unconditional halves in one call) spends one NFE of
the budget and adds k - 1 to `extra_cost`, so `nfe_equiv` counts the network's work.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from .contracts import Denoiser, DenoiserWrapper
from .errors import BudgetExceeded


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock readings are true on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CountingDenoiser(DenoiserWrapper):
    """Wraps a Denoiser; counts calls (at the model's resolution and others) and time in it."""

    def __init__(self, inner: Denoiser, budget: int | None = None) -> None:
        super().__init__(inner)
        self.budget = budget
        self.count_shape = self.shape
        self.nfe = 0
        self.extra = 0
        self.extra_cost = 0.0
        self.model_s = 0.0
        self.batch: int | None = None  # the samples per batch, set by the cell

    def reset(self) -> None:
        self.nfe, self.extra, self.extra_cost, self.model_s = 0, 0, 0.0, 0.0

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        # Tally the call: calls at the sampling resolution spend the budget
        if tuple(x.shape[1:]) == self.count_shape:
            if self.budget is not None and self.nfe >= self.budget:
                raise BudgetExceeded(
                    f"sampler made network call {self.nfe + 1} on a budget of {self.budget} NFE"
                )
            self.nfe += 1
            if self.batch and x.shape[0] > self.batch:
                self.extra_cost += x.shape[0] / self.batch - 1
        else:
            self.extra += 1
            self.extra_cost += x[0].numel() / math.prod(self.count_shape)
        # Time the network itself
        synchronize(x.device)
        start = time.perf_counter()
        out = self.inner(x, sigma, **cond)
        synchronize(x.device)
        self.model_s += time.perf_counter() - start
        return out
