"""The embedded MNIST models: a UNet trained on MNIST's 60,000 training digits, with EDM
preconditioning (`mnist`) and with the rectified-flow objective (`mnist-flow`)
(MODEL_CARD.md).

Data: `bench.data.mnist("train")`, 28x28 grey digits scaled to [-1, 1] as v / 127.5 - 1.

UNet: the digits UNet's blocks (`bench.models.digits.ResBlock`, `UpBlock`, the noise embedding)
at a CPU-friendly resolution: a 2x2 pixel-unshuffle stem folds 1x28x28 into 4x14x14, the
encoder runs at 14x14 and 7x7, self-attention in the 7x7 bottleneck, and a pixel-shuffle
unfolds the output. Every encoder ResBlock's output is a named skip that one decoder
block (`up[name]`) concatenates; the bottleneck feature comes back on request from the
same call. Fully convolutional: any H, W divisible by 4 (56x56 for upsample guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import training
from ..adapters import Flow, Preconditioned
from ..contracts import ModelSource
from ..errors import UsageError
from ..training import Recipe
from .digits import FourierEmbedding, ResBlock, UpBlock, embed_noise, norm

ASSETS = Path(__file__).parents[1] / "assets"
WEIGHTS = ASSETS / "mnist-unet.safetensors"
FLOW_WEIGHTS = ASSETS / "mnist-flow-unet.safetensors"
SIGMAS = (0.002, 80.0)  # EDM's range; mnist-flow's in t = sigma / (1 + sigma)
SHAPE = (1, 28, 28)
META_KEY = "bench.mnist"  # the weights files' metadata key


# --- Network --------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, pre-GroupNorm, residual
    (the attention block of DDPM / EDM's UNets); the output projection starts at zero."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        # Queries, keys and values per head: [B, heads, HW, C / heads]
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w).transpose(-1, -2).unbind(1)
        # softmax(q k^T / sqrt(d)) v, back to a feature map
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return x + self.proj((a @ v).transpose(-1, -2).reshape(b, c, h, w))


@dataclass(frozen=True)
class UNetConfig:
    """channels[i] at resolution H / (patch 2^i); `blocks` ResBlocks (each a skip) per level;
    the bottleneck is ResBlock, attention (`heads` > 0), ResBlock at the last level."""

    channels: tuple[int, ...] = (32, 64)
    blocks: int = 2
    heads: int = 4
    emb_dim: int = 128
    patch: int = 2
    image_channels: int = 1


class UNet(nn.Module):
    """F(x_in, c_noise): pixel-unshuffle, an encoder-decoder with named skips, pixel-shuffle.

    Encoder level i has `blocks` ResBlocks whose outputs are the skips `skip{k}`, numbered
    in the order they are made (k = 0 outermost), then a 2x average pool between levels.
    Decoder block `up[skip{k}]` (a `bench.models.digits.UpBlock`) concatenates skip k, the
    innermost first; the first block of a finer level upsamples. `skip_names` lists them
    outermost first. `forward(..., return_bottleneck=True)` returns (F, bottleneck feature).
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        ch, emb_dim, p = config.channels, config.emb_dim, config.patch
        self.embed = nn.Sequential(
            FourierEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.stem = nn.Conv2d(config.image_channels * p * p, ch[0], 3, padding=1)
        # Encoder: (level, input channels, output channels) of each ResBlock, one skip each
        plan = [(i, ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i])
                for i in range(len(ch)) for j in range(config.blocks)]
        self.skip_names = [f"skip{k}" for k in range(len(plan))]
        self.levels = [level for level, _, _ in plan]
        self.down = nn.ModuleList(ResBlock(c_in, c_out, emb_dim) for _, c_in, c_out in plan)
        mid = [ResBlock(ch[-1], ch[-1], emb_dim), ResBlock(ch[-1], ch[-1], emb_dim)]
        if config.heads:
            mid.insert(1, Attention(ch[-1], config.heads))
        self.mid = nn.ModuleList(mid)
        # Decoder, innermost skip first: each block ends at its skip's level and width
        up, c = {}, ch[-1]
        for k in reversed(range(len(plan))):
            level, _, c_skip = plan[k]
            scale = 2 if k + 1 < len(plan) and self.levels[k + 1] > level else 1
            up[self.skip_names[k]] = UpBlock(c, c_skip, ch[level], emb_dim, self.skip_names[k], scale)
            c = ch[level]
        self.up = nn.ModuleDict(up)
        self.out = nn.Sequential(
            norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], config.image_channels * p * p, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, return_bottleneck: bool = False):
        emb = embed_noise(self.embed, c_noise, len(x))
        # Stem: 2x2 patches of pixels to channels
        h, skips = self.stem(nn.functional.pixel_unshuffle(x, self.config.patch)), {}
        # Encoder: each ResBlock's output is its named skip; pool between levels
        for k, (name, block) in enumerate(zip(self.skip_names, self.down, strict=True)):
            if k and self.levels[k] > self.levels[k - 1]:
                h = nn.functional.avg_pool2d(h, 2)
            h = skips[name] = block(h, emb)
        # Bottleneck
        for block in self.mid:
            h = block(h, emb)
        bottleneck = h
        # Decoder, innermost skip first
        for name in reversed(self.skip_names):
            h = self.up[name](h, skips[name], emb)
        f = nn.functional.pixel_shuffle(self.out(h), self.config.patch)
        return (f, bottleneck) if return_bottleneck else f


# --- Training -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The EDM recipe (Karras et al. 2022, section 5) sized for MNIST on one CPU thread.

    sigma_data is MNIST's pixel standard deviation in [-1, 1] (0.616), rounded; P_mean and
    P_std are EDM's. `objective="flow"` trains the same UNet with rectified flow (SD3's
    logit-normal t, time scale 1000; model `mnist-flow`).
    """

    steps: int = 5000  # batch 128, Adam 2e-3, 200 warm-up steps: Recipe's
    ema_halflife: int = 300
    sigma_data: float = 0.62
    limit: int | None = None
    channels: tuple[int, ...] = UNetConfig.channels
    blocks: int = UNetConfig.blocks
    heads: int = UNetConfig.heads

    def unet(self) -> UNetConfig:
        return UNetConfig(channels=tuple(self.channels), blocks=self.blocks, heads=self.heads)


def mnist_images(split: str = "train", limit: int | None = None) -> Tensor:
    """MNIST's `split` as float32 [N, 1, 28, 28] in [-1, 1] (v / 127.5 - 1), the first `limit`."""
    from ..data import mnist

    images = mnist(split)[0][:limit]
    return torch.from_numpy(images.astype("float32") / 127.5 - 1).unsqueeze(1)


# --- Weights --------------------------------------------------------------------------


def load_unet(path: Path = WEIGHTS) -> tuple[UNet, dict[str, Any]]:
    """The UNet and its training configuration from a file written by `bench train-mnist`."""
    return training.load_unet(path, META_KEY, "train-mnist", UNet, UNetConfig)


# --- Model sources --------------------------------------------------------------------


def load_mnist(arg: str | None = None, device=None, **_) -> Preconditioned:
    """Model source `mnist[:PATH]`: the UNet (shipped weights, or PATH) with EDM preconditioning."""
    net, recipe = load_unet(Path(arg) if arg else WEIGHTS)
    return training.as_model(net, recipe, "edm", "mnist", arg, SHAPE, SIGMAS, data_samples)


def load_mnist_flow(arg: str | None = None, device=None, **_) -> Flow:
    """Model source `mnist-flow[:PATH]`: the UNet trained with rectified flow (velocity, time
    scale 1000), as bench.adapters.Flow over EDM's sigma range, its own `flow` schedule."""
    net, recipe = load_unet(Path(arg) if arg else FLOW_WEIGHTS)
    return training.as_model(net, recipe, "flow", "mnist", arg, SHAPE, SIGMAS, data_samples)


def data_samples(n: int, seed: int = 0) -> Tensor:
    """n real MNIST digits in [-1, 1] (bench.data.mnist_samples), for the metrics' floor."""
    from ..data import mnist_samples

    return mnist_samples(n, seed=seed)


# --- Command line ---------------------------------------------------------------------


def cmd_train_mnist(registry, args) -> int:
    """`bench train-mnist`: train the MNIST UNet (TrainConfig's recipe) and write its weights."""
    d = TrainConfig()
    if args.objective not in training.OBJECTIVES:
        raise UsageError(f"--objective: '{args.objective}' is not one of {', '.join(training.OBJECTIVES)}")
    training.positive(args, "steps", "batch_size", "limit")
    if args.heads is not None and args.heads < 0:
        raise UsageError(f"--heads: {args.heads}; give 0 (no attention) or a positive number of heads")
    channels = training.channel_list(args.channels) if args.channels else d.channels
    heads = d.heads if args.heads is None else args.heads
    if heads and channels[-1] % heads:
        raise UsageError(f"--heads: {heads} does not divide the bottleneck's {channels[-1]} channels")
    config = TrainConfig(
        steps=args.steps or d.steps,
        batch_size=args.batch_size or d.batch_size,
        lr=d.lr if args.lr is None else training.learning_rate_option(args.lr),
        seed=d.seed if args.seed is None else args.seed,
        objective=args.objective,
        limit=args.limit,
        channels=channels,
        blocks=args.blocks or d.blocks,
        heads=heads,
    )
    return training.run_training(config, partial(mnist_images, "train", config.limit),
                                 partial(UNet, config.unet()), args.out, META_KEY, args.quiet)


DEFAULT_METRICS = ("fid-mnist", "kid-mnist", "reference")  # the data; the model's own ODE, cached

SOURCES = [
    ModelSource(
        "mnist",
        load_mnist,
        "UNet trained on MNIST's 60k 28x28 digits, EDM preconditioning, shipped weights (mnist[:PATH])",
        default_metrics=DEFAULT_METRICS,
    ),
    ModelSource(
        "mnist-flow",
        load_mnist_flow,
        "the MNIST UNet trained with rectified flow (velocity), flow schedule, shipped weights "
        "(mnist-flow[:PATH])",
        default_metrics=DEFAULT_METRICS,
    ),
]
