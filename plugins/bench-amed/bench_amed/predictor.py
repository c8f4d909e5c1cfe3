"""The AMED predictor (Zhou et al., CVPR 2024, "Fast ODE-based Sampling for Diffusion
Models in Around 5 Steps", Sec. 3.3): a tiny network that gives, for one interval
sigma_cur -> sigma_next, the intermediate point r, the direction scale c and the time
scale a of the mean-value step.

Inputs are positional embeddings of both sigmas and, when the model exposes it, a summary
of the UNet bottleneck feature of the call at sigma_cur (`bottleneck_summary`). A
predictor without the feature ("sigma-only") learns one (r, c, a) per interval. Sigmoid
heads bound the outputs: r in (0, 1), c in [1 - scale_dir, 1 + scale_dir],
a in [1 - scale_time, 1 + scale_time]. The heads start at zero, so an unfitted predictor
gives the geometric midpoint r = 1/2 with c = a = 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import UsageError

MAX_SIDE = 8  # larger bottlenecks are averaged down to MAX_SIDE x MAX_SIDE
MAX_FEATURES = MAX_SIDE * MAX_SIDE  # numbers per sample the predictor reads from the bottleneck


@dataclass(frozen=True)
class PredictorConfig:
    """The predictor's shape; stored beside its weights."""

    feature_dim: int = 0  # flattened bottleneck size after pooling; 0 = sigma-only
    hidden_dim: int = 128
    feature_out: int = 4
    channels: int = 8  # embedding channels per sigma
    scale_dir: float = 0.01
    scale_time: float = 0.2

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def kind(self) -> str:
        return "bottleneck" if self.feature_dim else "sigma-only"


def bottleneck_summary(feature: Tensor) -> Tensor:
    """[B, C, h, w] bottleneck -> [B, g * h' * w'], at most MAX_FEATURES numbers per sample.

    The paper's summary is the channel mean of an 8x8 bottleneck (64 numbers). Larger maps
    are average-pooled to 8x8 first; smaller ones keep the channel mean of g channel groups,
    the most groups (dividing C) that fit, so a 2x2 map with 96 channels gives 16 x 2 x 2.
    """
    if feature.shape[-2] * feature.shape[-1] > MAX_FEATURES:
        feature = F.adaptive_avg_pool2d(feature, (MAX_SIDE, MAX_SIDE))
    b, c, h, w = feature.shape
    groups = max(g for g in range(1, c + 1) if c % g == 0 and g * h * w <= max(MAX_FEATURES, h * w))
    return feature.float().reshape(b, groups, c // groups, h, w).mean(2).flatten(1)


def sigma_embedding(sigma: Tensor, channels: int) -> Tensor:
    """cos/sin of c_noise = ln(sigma) / 4 (EDM's noise input) at octave frequencies: [B, channels]."""
    freqs = 2.0 ** torch.arange(channels // 2, dtype=torch.float32, device=sigma.device)
    arg = (sigma.float().reshape(-1, 1).log() / 4) * freqs
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class AMEDPredictor(nn.Module):
    """(r, c, a) for an interval, each of shape [B, 1, 1, 1] (or [1, 1, 1, 1] sigma-only)."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.channels, config.channels)
        width = 2 * config.channels
        if config.feature_dim:
            self.encode = nn.Sequential(
                nn.Linear(config.feature_dim, config.hidden_dim),
                nn.SiLU(),
                nn.Linear(config.hidden_dim, config.feature_out),
            )
            width += config.feature_out
        self.heads = nn.Linear(width, 3)
        nn.init.zeros_(self.heads.weight)
        nn.init.zeros_(self.heads.bias)

    @property
    def uses_bottleneck(self) -> bool:
        return self.config.feature_dim > 0

    def forward(self, feature: Tensor | None, sigma_cur: Tensor, sigma_next: Tensor):
        # Embed both sigmas with one shared layer, then join them
        pair = torch.stack([torch.as_tensor(sigma_cur), torch.as_tensor(sigma_next)]).to(
            self.heads.weight.device
        )
        emb = F.silu(self.embed(sigma_embedding(pair, self.config.channels))).reshape(1, -1)
        # Append the encoded bottleneck feature, one row per sample
        if self.uses_bottleneck:
            if feature is None:
                raise ValueError("this AMED predictor needs the model's bottleneck feature")
            code = self.encode(feature.to(emb))
            emb = torch.cat([emb.expand(len(code), -1), code], dim=1)
        # Bounded heads: r in (0, 1), c and a around 1
        r, c, a = torch.sigmoid(self.heads(emb)).unbind(1)
        c = 1 + self.config.scale_dir * (2 * c - 1)
        a = 1 + self.config.scale_time * (2 * a - 1)
        return tuple(v.reshape(-1, 1, 1, 1) for v in (r, c, a))


def midpoint(device) -> tuple[Tensor, Tensor, Tensor]:
    """The unfitted step: r = 1/2 (geometric midpoint), c = a = 1."""
    half = torch.full((1, 1, 1, 1), 0.5, device=device)
    return half, torch.ones_like(half), torch.ones_like(half)


def weights_are_finite(predictor: AMEDPredictor) -> bool:
    """Every weight is a finite number (a corrupt file can load but hold NaN)."""
    return all(bool(torch.isfinite(p).all()) for p in predictor.state_dict().values())


def check_scale(name: str, value: float) -> float:
    """A scale must lie in [0, 1), so that c and a stay positive."""
    if not (0 <= value < 1) or math.isnan(value):
        raise UsageError(f"AMED option {name} must lie in [0, 1); got {value}")
    return value
