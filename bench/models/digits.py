"""The embedded pretrained models: a small UNet trained on scikit-learn's digits, and the
exact optimal denoiser of the same training set (MODEL_CARD.md).

Data: all 1797 digits of `bench.metrics.digits_classifier.digits` (8x8, grey levels 0..16 scaled
to [-1, 1] as v / 8 - 1), the images the digits feature space's reference statistics
come from.

UNet: an encoder-decoder whose decoder blocks concatenate named encoder skips; it is
fully convolutional (any H, W divisible by 4) and returns its bottleneck feature on
request. It is trained with the EDM loss (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", section 5 and Table 1) and wrapped with EDM
preconditioning by `bench.adapters.Preconditioned`; `digits-flow` is the same UNet trained
with the rectified-flow objective (velocity, SD3's logit-normal t) and wrapped by
`bench.adapters.Flow`.

Optimal denoiser: for a finite training set {y_i},
D(x, sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i, a mixture of
zero-variance Gaussians (`bench.models.GaussianMixture`).
"""

from __future__ import annotations

from collections.abc import Callable
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
from ..training import FLOW_FIELDS, Recipe  # noqa: F401 (FLOW_FIELDS: the digits metadata's)
from .analytic import GaussianMixture

ASSETS = Path(__file__).parents[1] / "assets"
WEIGHTS = ASSETS / "digits-unet.safetensors"
FLOW_WEIGHTS = ASSETS / "digits-flow-unet.safetensors"
SIGMAS = (0.002, 80.0)  # both models' sigma range (EDM's); digits-flow's t = sigma / (1 + sigma)
SHAPE = (1, 8, 8)
META_KEY = "bench.digits"  # the weights files' metadata key (unchanged since 0.1)


# --- Network --------------------------------------------------------------------------


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise condition c_noise (EDM's PositionalEmbedding)."""

    def __init__(self, dim: int, max_positions: int = 10000) -> None:
        super().__init__()
        freqs = (1 / max_positions) ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        self.register_buffer("freqs", freqs)

    def forward(self, c_noise: Tensor) -> Tensor:
        angle = c_noise.reshape(-1, 1).float() * self.freqs
        return torch.cat([angle.cos(), angle.sin()], dim=1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding as a per-channel scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm0, self.conv0 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * c_out)
        self.norm1, self.conv1 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(nn.functional.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = nn.functional.silu(self.norm1(h) * (1 + scale) + shift)
        return self.shortcut(x) + self.conv1(h)


class UpBlock(nn.Module):
    """One decoder block: upsample h (nearest, by `scale`; 1 keeps the resolution),
    concatenate the encoder skip `skip_name`, merge, ResBlock.

    The concatenation goes through a 1x1 convolution before any normalisation, so a
    modifier that scales the `skip` argument (a forward pre-hook on this block) changes
    the output linearly instead of being normalised away.
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int, emb_dim: int, skip_name: str,
                 scale: int = 2) -> None:
        super().__init__()
        self.skip_name, self.scale = skip_name, scale
        self.merge = nn.Conv2d(c_in + c_skip, c_out, 1)
        self.block = ResBlock(c_out, c_out, emb_dim)

    def forward(self, h: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        if self.scale > 1:
            h = nn.functional.interpolate(h, scale_factor=self.scale, mode="nearest")
        return self.block(self.merge(torch.cat([h, skip], dim=1)), emb)


def embed_noise(embed: nn.Module, c_noise: Tensor, batch: int) -> Tensor:
    """The noise embedding of each sample, computed once per distinct noise level in the
    batch (per sample when c_noise needs a gradient, e.g. a fitted sampler's learned sigma:
    unique has none)."""
    if c_noise.requires_grad:
        return embed(c_noise.expand(batch))
    levels, which = torch.unique(c_noise.expand(batch), return_inverse=True)
    return embed(levels)[which]


@dataclass(frozen=True)
class UNetConfig:
    """Channels per level: channels[i] at resolution H / 2^i; the last is the bottleneck."""

    channels: tuple[int, ...] = (32, 64, 96)
    emb_dim: int = 64
    image_channels: int = 1


class UNet(nn.Module):
    """F(x_in, c_noise) of the EDM preconditioning: an encoder-decoder with named skips.

    Encoder level i (i = 0 outermost, at full resolution) is a ResBlock whose output is
    the skip `skip{i}`, then a 2x average-pool; the bottleneck is two ResBlocks at
    H / 2^L. Decoder block `up[skip{i}]` (an UpBlock) upsamples, concatenates `skip{i}`
    and merges; it runs innermost first. `skip_names` lists them outermost first.
    `forward(..., return_bottleneck=True)` returns (F, bottleneck feature).
    """

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        ch, emb_dim = config.channels, config.emb_dim
        self.embed = nn.Sequential(
            FourierEmbedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.stem = nn.Conv2d(config.image_channels, ch[0], 3, padding=1)
        self.skip_names = [f"skip{i}" for i in range(len(ch) - 1)]
        self.down = nn.ModuleList(ResBlock(ch[max(i - 1, 0)], ch[i], emb_dim) for i in range(len(ch) - 1))
        self.mid = nn.ModuleList([ResBlock(ch[-2], ch[-1], emb_dim), ResBlock(ch[-1], ch[-1], emb_dim)])
        self.up = nn.ModuleDict(
            {name: UpBlock(ch[i + 1], ch[i], ch[i], emb_dim, name) for i, name in enumerate(self.skip_names)}
        )
        self.out = nn.Sequential(
            norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], config.image_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, return_bottleneck: bool = False):
        emb = embed_noise(self.embed, c_noise, len(x))
        # Encoder: keep each level's output as its named skip
        h, skips = self.stem(x), {}
        for name, block in zip(self.skip_names, self.down, strict=True):
            h = skips[name] = block(h, emb)
            h = nn.functional.avg_pool2d(h, 2)
        # Bottleneck
        for block in self.mid:
            h = block(h, emb)
        bottleneck = h
        # Decoder, innermost level first, each block taking its own skip
        for name in reversed(self.skip_names):
            h = self.up[name](h, skips[name], emb)
        f = self.out(h)
        return (f, bottleneck) if return_bottleneck else f


# --- Training -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """The EDM training recipe (Karras et al. 2022, section 5), sized for the digits.

    sigma_data is the pixel standard deviation of the digits in [-1, 1] (0.752), not
    EDM's 0.5 for CIFAR-10; P_mean and P_std are EDM's. `objective="flow"` trains the
    same UNet with rectified flow (model `digits-flow`; bench.training).
    """

    sigma_data: float = 0.75
    limit: int | None = None
    channels: tuple[int, ...] = UNetConfig.channels


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> tuple[UNet, dict[str, Any]]:
    """Train the digits UNet on all 1797 digits (the first `limit`); returns the EMA network
    and a summary. Deterministic on the CPU (bench.training.train)."""
    from ..metrics.digits_classifier import digits

    data = digits()[0][: config.limit]
    return training.train(config, data, partial(UNet, UNetConfig(channels=tuple(config.channels))), log)


# --- Weights --------------------------------------------------------------------------


def save_weights(path: Path, net: UNet, config: TrainConfig, summary: dict[str, Any]) -> None:
    """safetensors with the network and training configuration in its metadata."""
    training.save_weights(path, META_KEY, net, config, summary)


def load_unet(path: Path = WEIGHTS) -> tuple[UNet, dict[str, Any]]:
    """The UNet and its training configuration from a weights file written by `save_weights`."""
    return training.load_unet(path, META_KEY, "train-digits", UNet, UNetConfig)


# --- Model sources --------------------------------------------------------------------


def load_digits(arg: str | None = None, device=None, **_) -> Preconditioned:
    """Model source `digits[:PATH]`: the UNet (shipped weights, or PATH) with EDM preconditioning."""
    net, recipe = load_unet(Path(arg) if arg else WEIGHTS)
    return training.as_model(net, recipe, "edm", "digits", arg, SHAPE, SIGMAS, digits_samples)


def load_digits_flow(arg: str | None = None, device=None, **_) -> Flow:
    """Model source `digits-flow[:PATH]`: the UNet trained with the rectified-flow objective
    (velocity, time scale 1000), as bench.adapters.Flow over digits' sigma range."""
    net, recipe = load_unet(Path(arg) if arg else FLOW_WEIGHTS)
    return training.as_model(net, recipe, "flow", "digits", arg, SHAPE, SIGMAS, digits_samples)


def digits_samples(n: int, seed: int = 0) -> Tensor:
    """n of the 1797 digits (without replacement up to 1797), in [-1, 1]: real data at n."""
    from ..metrics.digits_classifier import digits

    images = digits()[0]
    gen = torch.Generator().manual_seed(seed)
    if n <= len(images):
        return images[torch.randperm(len(images), generator=gen)[:n]]
    return images[torch.randint(len(images), (n,), generator=gen)]


class OptimalDenoiser(GaussianMixture):
    """The exact denoiser of the empirical distribution of training images {y_i}:
    D(x, sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i, in float64.

    A Gaussian mixture with one zero-variance component per image; the squared distances
    are matrix products, so memory is O(batch x images) for any per-sample sigma.
    """

    def __init__(self, images: Tensor, name: str) -> None:
        n = len(images)
        super().__init__(images, torch.zeros_like(images), torch.ones(n), images.shape[1:], name)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        xf = x.double().reshape(len(x), -1)
        # |x - y_i|^2 for every training image
        dist = (xf**2).sum(1, keepdim=True) - 2 * xf @ self.mu.T + (self.mu**2).sum(1)
        # Posterior weights of the images, and their weighted average
        w = torch.softmax(-dist / (2 * sigma.double().reshape(-1, 1) ** 2), dim=1)
        return (w @ self.mu).reshape(x.shape).to(x.dtype)


def load_digits_optimal(arg: str | None = None, device=None, **_) -> OptimalDenoiser:
    """Model source `digits-optimal`: the exact denoiser of the 1797 digits."""
    from ..metrics.digits_classifier import digits

    if arg:
        raise UsageError(f"model 'digits-optimal' takes no argument; got '{arg}'")
    return OptimalDenoiser(digits()[0], "digits-optimal")


# --- Command line ---------------------------------------------------------------------


def cmd_train_digits(registry, args) -> int:
    d = TrainConfig()
    for key, default in (("steps", d.steps), ("batch_size", d.batch_size), ("lr", d.lr), ("seed", d.seed),
                         ("channels", ",".join(map(str, d.channels)))):
        if getattr(args, key) is None:
            setattr(args, key, default)
    channels = training.channel_list(args.channels)
    training.positive(args, "steps", "batch_size")
    training.learning_rate_option(args.lr)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: {args.limit} digits; give a positive count (or leave it out for all)")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         limit=args.limit, channels=channels, objective=args.objective)
    if config.objective not in training.OBJECTIVES:
        raise UsageError(f"--objective: '{config.objective}' is not one of {', '.join(training.OBJECTIVES)}")
    from ..metrics.digits_classifier import digits

    build = partial(UNet, UNetConfig(channels=channels))
    return training.run_training(config, lambda: digits()[0][: config.limit], build, args.out, META_KEY,
                                 args.quiet)


# FID and KID against the data; `reference`, the error to the model's own ODE, solved once and cached
DEFAULT_METRICS = ("fid-digits", "kid-digits", "reference")

SOURCES = [
    ModelSource(
        "digits",
        load_digits,
        "UNet trained on scikit-learn's 8x8 digits, EDM preconditioning, shipped weights (digits[:PATH])",
        default_metrics=DEFAULT_METRICS,
    ),
    ModelSource(
        "digits-flow",
        load_digits_flow,
        "the digits UNet trained with rectified flow (velocity), flow schedule, shipped weights "
        "(digits-flow[:PATH])",
        default_metrics=DEFAULT_METRICS,
    ),
    ModelSource(
        "digits-optimal",
        load_digits_optimal,
        "exact optimal denoiser of the 1797 digits (softmax-weighted average of the images)",
        default_metrics=DEFAULT_METRICS,
    ),
]
