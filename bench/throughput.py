"""GPU throughput: how a run executes the network.

`bench run --dtype bf16|fp16 --channels-last --compile` wraps the loaded model in
`Accelerated`, under the NFE counter: the network runs under torch.autocast in the given
precision, on channels_last tensors, through torch.compile; samplers keep their state in
float32 and metrics get the model in full precision. Each cell records the options. The
model for speed measurements on a real architecture is bench.models.random.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .contracts import Denoiser, DenoiserWrapper
from .errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Accelerated(DenoiserWrapper):
    """The model as a run executes it: autocast to `dtype`, channels_last inputs and
    weights, torch.compile; the output is cast back to the input's dtype."""

    def __init__(
        self, inner: Denoiser, dtype: str = "fp32", channels_last: bool = False, compile: bool = False
    ) -> None:
        super().__init__(inner)
        self.autocast = DTYPES[dtype]
        self.channels_last = channels_last
        if channels_last:
            inner.to(memory_format=torch.channels_last)
        # Kept out of the module tree: the compiled function is not a second copy of the model
        self.__dict__["call"] = torch.compile(inner) if compile else inner

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Any:
        # Inputs in the network's memory format, the network in the run's precision
        x_in = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast != torch.float32):
            out = self.__dict__["call"](x_in, sigma, **cond)
        # Back to the sampler's dtype and layout (a bottleneck feature rides along as is)
        if isinstance(out, tuple):
            return (out[0].to(x.dtype).contiguous(), *out[1:])
        return out.to(x.dtype).contiguous()


def accelerate(
    denoiser: Denoiser, dtype: str = "fp32", channels_last: bool = False, compile: bool = False
) -> Denoiser:
    """`denoiser` run with the given options; itself when they are all the defaults."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if (dtype, channels_last, compile) == ("fp32", False, False):
        return denoiser
    return Accelerated(denoiser, dtype, channels_last, compile)


def full_precision(denoiser: Denoiser) -> Denoiser:
    """The model under the run options: what metrics and reference solves use."""
    return denoiser.inner if isinstance(denoiser, Accelerated) else denoiser
