"""`throughput-ddpm-cifar10[:SEED]`: a diffusers UNet2DModel in the configuration of
google/ddpm-cifar10-32 (35.7M parameters, discrete VP, eps-prediction), built in code with
RANDOM weights: its samples are noise and its metrics meaningless; it measures speed on a
real public architecture without downloading anything (benchmarks/throughput.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..adapters import DiscreteVP
from ..contracts import Denoiser, ModelSource
from ..errors import UsageError

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
