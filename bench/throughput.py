"""GPU throughput: how a run executes the network, and a model for speed measurements.

`bench run --dtype bf16|fp16 --channels-last --compile` wraps the loaded model in
`Accelerated`, under the NFE counter: the network runs under torch.autocast in the given
precision, on channels_last tensors, through torch.compile; samplers keep their state in
float32 and metrics get the model in full precision. Each cell records the options.

`throughput-ddpm-cifar10` is a diffusers UNet2DModel in the configuration of
google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 network, 35.7M parameters) with RANDOM
weights, built in code (nothing is downloaded): its samples are noise and its metrics
meaningless; it exists to measure images per second and time inside the network on a real
architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .adapters import DiscreteVP
from .contracts import Denoiser, DenoiserWrapper, ModelSource
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


# --- The throughput model -------------------------------------------------------------

# google/ddpm-cifar10-32's unet/config.json (diffusers UNet2DModel)
DDPM_CIFAR10_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}
# ... and its scheduler: DDPM's linear betas from 1e-4 to 0.02 over 1000 steps
DDPM_BETAS = (1e-4, 0.02, 1000)


class RandomWeights(DiscreteVP):
    """A discrete VP eps-prediction network with random weights: for speed only."""

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "weights": "random init (speed measurements only)",
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }


def ddpm_cifar10_random(seed: int = 0) -> RandomWeights:
    """google/ddpm-cifar10-32's UNet with random weights drawn from `seed` (global RNG untouched)."""
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**DDPM_CIFAR10_UNET).eval()
    start, end, steps = DDPM_BETAS
    betas = torch.linspace(start, end, steps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def net_fn(x_vp: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return unet(x_vp, t, **cond).sample

    return RandomWeights(net_fn, alphas_cumprod, (3, 32, 32), prediction="epsilon", net=unet)


def load_throughput(arg: str | None, device=None, **_: Any) -> Denoiser:
    """throughput-ddpm-cifar10[:SEED]: the random-weight network."""
    try:
        seed = int(arg) if arg else 0
    except ValueError:
        raise UsageError(f"throughput-ddpm-cifar10:{arg}: the argument is an integer seed") from None
    return ddpm_cifar10_random(seed)


SOURCES = (
    ModelSource(
        "throughput-ddpm-cifar10",
        load_throughput,
        "RANDOM WEIGHTS, for speed measurements only: diffusers UNet2DModel in google/ddpm-cifar10-32's "
        "configuration (35.7M parameters), discrete VP eps-prediction; throughput-ddpm-cifar10[:SEED]",
    ),
)
