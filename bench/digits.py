"""The embedded pretrained models: a small UNet trained on scikit-learn's digits, and the
exact optimal denoiser of the same training set (MODEL_CARD.md).

Data: all 1797 digits of `bench.digits_classifier.digits` (8x8, grey levels 0..16 scaled
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

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import Flow, Preconditioned
from .contracts import ModelSource
from .errors import ModelLoadError, UsageError
from .models import GaussianMixture

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "digits-unet.safetensors"
FLOW_WEIGHTS = ASSETS / "digits-flow-unet.safetensors"
FLOW_SIGMAS = (0.002, 80.0)  # digits-flow's sigma range: the digits model's, t = sigma / (1 + sigma)
SHAPE = (1, 8, 8)
META_KEY = "bench.digits"


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
    """One decoder level: upsample h, concatenate the encoder skip `skip_name`, merge, ResBlock.

    The concatenation goes through a 1x1 convolution before any normalisation, so a
    modifier that scales the `skip` argument (a forward pre-hook on this block) changes
    the output linearly instead of being normalised away.
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int, emb_dim: int, skip_name: str) -> None:
        super().__init__()
        self.skip_name = skip_name
        self.merge = nn.Conv2d(c_in + c_skip, c_out, 1)
        self.block = ResBlock(c_out, c_out, emb_dim)

    def forward(self, h: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        return self.block(self.merge(torch.cat([h, skip], dim=1)), emb)


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
        # Noise embedding, computed once per distinct noise level in the batch (per sample
        # when c_noise needs a gradient, e.g. a fitted sampler's learned sigma: unique has none)
        if c_noise.requires_grad:
            emb = self.embed(c_noise.expand(len(x)))
        else:
            levels, which = torch.unique(c_noise.expand(len(x)), return_inverse=True)
            emb = self.embed(levels)[which]
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
class TrainConfig:
    """The EDM training recipe (Karras et al. 2022, section 5), sized for the digits.

    sigma_data is the pixel standard deviation of the digits in [-1, 1] (0.752), not
    EDM's 0.5 for CIFAR-10; P_mean and P_std are EDM's.
    """

    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    ema_halflife: int = 200
    sigma_data: float = 0.75
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    limit: int | None = None
    channels: tuple[int, ...] = UNetConfig.channels
    # The rectified-flow objective (`objective="flow"`, model `digits-flow`): t from
    # logit-normal(logit_mean, logit_std) as SD3; the network sees t * time_scale
    objective: str = "edm"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0


OBJECTIVES = ("edm", "flow")
FLOW_FIELDS = ("objective", "logit_mean", "logit_std", "time_scale")  # absent from EDM metadata


def edm_loss(denoiser: Preconditioned, y: Tensor, n: Tensor, sigma: Tensor) -> Tensor:
    """EDM's loss: lambda(sigma) |D(y + sigma n, sigma) - y|^2, lambda = (s^2 + sd^2) / (s sd)^2."""
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    d_y = denoiser(y + sigma.reshape(-1, 1, 1, 1) * n, sigma)
    return (weight.reshape(-1, 1, 1, 1) * (d_y - y) ** 2).mean()


def flow_loss(net: UNet, y: Tensor, n: Tensor, t: Tensor, time_scale: float) -> Tensor:
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) y + t n,
    loss |v_theta(x_t, t) - (n - y)|^2."""
    s = t.reshape(-1, 1, 1, 1)
    v = net((1 - s) * y + s * n, t * time_scale)
    return ((v - (n - y)) ** 2).mean()


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> tuple[UNet, dict[str, Any]]:
    """Train the digits UNet; returns the EMA network and a summary. Deterministic on the CPU.

    Adam with a linear warm-up then a cosine decay of the learning rate; every random
    number comes from one generator seeded with `config.seed`; the EMA of the weights
    (half-life `ema_halflife` steps) is what ships. `objective="flow"` draws t where EDM
    draws sigma (the same number of random draws per step) and trains the velocity.
    """
    if config.objective not in OBJECTIVES:
        raise UsageError(f"--objective: '{config.objective}' is not one of {', '.join(OBJECTIVES)}")
    from .digits_classifier import digits

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    data = digits()[0][: config.limit]
    net = UNet(UNetConfig(channels=tuple(config.channels)))
    ema = UNet(net.config).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    denoiser = Preconditioned(net, "edm", SHAPE, sigma_data=config.sigma_data)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    ema_beta = 0.5 ** (1 / config.ema_halflife)
    losses = []
    for step in range(config.steps):
        # A batch of digits, their noise and the normal draws of their noise levels (sigma or t)
        y = data[torch.randint(len(data), (config.batch_size,), generator=gen)]
        n = torch.randn(y.shape, generator=gen)
        z = torch.randn(len(y), generator=gen)
        # One Adam step at the scheduled learning rate
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, step)
        if config.objective == "flow":
            t = torch.sigmoid(config.logit_mean + config.logit_std * z)
            loss = flow_loss(net, y, n, t, config.time_scale)
        else:
            loss = edm_loss(denoiser, y, n, (config.p_mean + config.p_std * z).exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # The exponential moving average of the weights
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema_beta)
        losses.append(loss.item())
        if log and (step + 1) % 500 == 0:
            log(f"step {step + 1}/{config.steps}  loss {sum(losses[-500:]) / len(losses[-500:]):.4f}")
    tail = losses[-min(len(losses), 200) :]
    return ema.eval(), {"final_loss": sum(tail) / len(tail), "final_loss_steps": len(tail)}


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine decay to zero."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


# --- Weights --------------------------------------------------------------------------


def save_weights(path: Path, net: UNet, config: TrainConfig, summary: dict[str, Any]) -> None:
    """safetensors with the network and training configuration in its metadata.

    The metadata is one JSON string under a single key: safetensors writes several keys
    in no fixed order, which would make the bytes of two identical trainings differ.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    train_meta = asdict(config)
    if config.objective == "edm":  # the EDM file's metadata as before the flow objective
        train_meta = {k: v for k, v in train_meta.items() if k not in FLOW_FIELDS}
    meta = {
        "unet": asdict(net.config),
        "train": train_meta,
        "summary": summary,
        "torch": torch.__version__,
    }
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def load_unet(path: Path = WEIGHTS) -> tuple[UNet, dict[str, Any]]:
    """The UNet and its training configuration from a weights file written by `save_weights`."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ModelLoadError(
            f"digits weights '{path}' not found; write them with `bench train-digits --out {path}`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta is None:
        raise ModelLoadError(f"'{path}' has no digits UNet metadata; write it with `bench train-digits`")
    net = UNet(UNetConfig(**{**meta["unet"], "channels": tuple(meta["unet"]["channels"])}))
    net.load_state_dict(tensors)
    return net.eval().requires_grad_(False), meta["train"]


# --- Model sources --------------------------------------------------------------------


def load_digits(arg: str | None = None, device=None, **_) -> Preconditioned:
    """Model source `digits[:PATH]`: the UNet (shipped weights, or PATH) with EDM preconditioning."""
    net, train_config = load_unet(Path(arg) if arg else WEIGHTS)
    if train_config.get("objective", "edm") != "edm":
        raise ModelLoadError(f"'{arg}' was trained with --objective {train_config['objective']}; "
                             f"load it as digits-flow:{arg}")
    model = Preconditioned(net, "edm", SHAPE, sigma_data=train_config["sigma_data"], has_bottleneck=True)
    model.data_samples = digits_samples  # the data it was trained on, for the metrics' floor
    return model


def load_digits_flow(arg: str | None = None, device=None, **_) -> Flow:
    """Model source `digits-flow[:PATH]`: the UNet trained with the rectified-flow objective
    (velocity, time scale 1000), as bench.adapters.Flow over digits' sigma range."""
    net, train_config = load_unet(Path(arg) if arg else FLOW_WEIGHTS)
    if train_config.get("objective", "edm") != "flow":
        raise ModelLoadError(f"'{arg}' was trained with the EDM objective; load it as digits:{arg}")
    (s_min, s_max), scale = FLOW_SIGMAS, train_config["time_scale"]
    model = Flow(net, SHAPE, prediction="velocity", net=net, time_scale=scale,
                 t_min=s_min / (1 + s_min), t_max=s_max / (1 + s_max), sigma_data=train_config["sigma_data"])
    model.data_samples = digits_samples  # the data it was trained on, for the metrics' floor
    return model


def digits_samples(n: int, seed: int = 0) -> Tensor:
    """n of the 1797 digits (without replacement up to 1797), in [-1, 1]: real data at n."""
    from .digits_classifier import digits

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
    from .digits_classifier import digits

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
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise UsageError(f"--channels: '{args.channels}' is not a comma list of integers") from None
    if args.steps < 1 or args.batch_size < 1 or len(channels) < 2 or min(channels) < 4:
        raise UsageError(
            "--steps and --batch-size must be positive; --channels needs two or more levels >= 4"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr: {args.lr} is not a positive finite learning rate, e.g. 2e-3")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: {args.limit} digits; give a positive count (or leave it out for all)")
    from .files import writable_file

    writable_file(args.out, "--out")  # before the training, not after it
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        limit=args.limit,
        channels=channels,
        objective=args.objective,
    )
    log = None if args.quiet else partial(print, flush=True)
    # Deterministic kernels on one thread (reduction order then does not depend on the
    # machine's core count), restored afterwards
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        net, summary = train(config, log)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])
    save_weights(args.out, net, config, summary)
    print(
        json.dumps(
            {
                "out": str(args.out),
                **summary,
                "train_s": round(seconds, 1),
                "cpu_s": round(cpu_seconds, 1),
                "parameters": sum(p.numel() for p in net.parameters()),
            }
        )
    )
    return 0


DEFAULT_METRICS = ("fid-digits", "kid-digits")

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
