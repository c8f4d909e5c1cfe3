"""CLIP score: how well each sample matches its prompt, by a local CLIP checkpoint.

`clip`: sample i of a cell has prompt prompts[i % len(prompts)], the model's `prompts`
(what a text-conditioned model exposes); its score is 100 * cos(E_image(x_i), E_text(p_i))
with transformers' CLIPModel, and the value the mean over samples (torchmetrics' CLIPScore
before its clamp at 0), with its plain standard error s / sqrt(n) and replicates for the
paired bootstrap. The checkpoint is the metric option `clip=DIR`: a directory written by
`CLIPModel.save_pretrained` with its tokenizer (a local copy of openai/clip-vit-base-patch32,
say); nothing is downloaded.

Images: samples in [-1, 1] are quantised to uint8 as EDM saves them, grey repeated to RGB,
resized (bicubic, antialiased) so the short side is the model's image size, centre-cropped
and normalised with the checkpoint's `preprocessor_config.json` mean and std (CLIP's own
when absent): CLIPImageProcessor's steps, in torch on the run's device.

transformers is imported when the metric is created, never with this module.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..contracts import Batch, Metric, MetricContext, Value
from ..errors import ModelLoadError
from ..stats import Bootstrapped, bootstrap_b, counts
from . import image_shape

# CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHERE = ("a directory saved by transformers' CLIPModel.save_pretrained with its tokenizer "
         "(a local copy of openai/clip-vit-base-patch32, say)")


def clip_applies(ctx: MetricContext) -> str | None:
    """Why the CLIP score cannot run: no checkpoint directory, no transformers, no prompts."""
    where = ctx.options.get("clip")
    if not where:
        return f"it needs a local CLIP checkpoint: pass --metric-option clip=DIR, {WHERE}"
    if not (Path(where).expanduser() / "config.json").is_file():
        return f"--metric-option clip={where}: no CLIP checkpoint there (no config.json); put {WHERE} there"
    if importlib.util.find_spec("transformers") is None:
        return "it needs transformers: pip install transformers"
    if not ctx.denoiser.prompts:
        return "the model has no prompts (a text-conditioned model lists them as `prompts`)"
    c = image_shape(ctx.denoiser)[0]
    return None if c in (1, 3) else f"CLIP takes grey or RGB images, the model's have {c} channels"


class Clip:
    """A CLIP checkpoint on a device: unit image and text embeddings."""

    def __init__(self, where: str, device: torch.device) -> None:
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = Path(where).expanduser()
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            raise ModelLoadError(f"--metric-option clip={where}: not a CLIP checkpoint "
                                 f"({type(exc).__name__}: {detail}); put {WHERE} there") from None
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        mean, std = _normalisation(path)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def text(self, prompts: list[str]) -> Tensor:
        """Unit text embeddings [P, d] (float32)."""
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**enc))

    @torch.no_grad()
    def image(self, x0: Tensor) -> Tensor:
        """Unit image embeddings [B, d] (float32) of samples in [-1, 1]."""
        return _unit(self.model.get_image_features(pixel_values=self.pixels(x0)))

    def pixels(self, x0: Tensor) -> Tensor:
        """CLIPImageProcessor's steps in torch: uint8 levels, RGB, short side resized, crop, normalise."""
        x = (x0.detach().float() * 127.5 + 128).clamp(0, 255).floor() / 255  # EDM's uint8 levels
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size].clamp(0, 1)
        return ((x.to(self.device) - self.mean) / self.std).float()


def _unit(out: Any) -> Tensor:
    """Embeddings from get_*_features (a tensor, or an output's pooler_output), unit length."""
    emb = out if isinstance(out, Tensor) else out.pooler_output
    return F.normalize(emb.float(), dim=-1)


def _normalisation(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's image mean and std, else CLIP's."""
    try:
        config = json.loads((path / "preprocessor_config.json").read_text())
        return tuple(config["image_mean"]), tuple(config["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return CLIP_MEAN, CLIP_STD


class ClipScore(Bootstrapped):
    """100 * cos(image, prompt) per sample; the mean, its standard error, weighted-mean replicates."""

    def __init__(self, ctx: MetricContext) -> None:
        where = str(ctx.options.get("clip") or "")
        key = ("clip", where, str(ctx.device))
        if key not in ctx.cache:  # one model and one set of text embeddings per run
            clip = Clip(where, ctx.device)
            prompts = [str(p) for p in ctx.denoiser.prompts or []]
            ctx.cache[key] = (clip, clip.text(prompts) if prompts else None)
        self.clip, self.text = ctx.cache[key]
        if self.text is None:
            raise ValueError("metric 'clip': the model has no prompts")
        self.scores: list[Tensor] = []
        self.bootstrap_b = bootstrap_b(ctx.options)

    def update(self, batch: Batch) -> None:
        image = self.clip.image(batch.x0)
        text = self.text[batch.indices.to(self.text.device) % len(self.text)]
        self.scores.append((100 * (image * text).sum(1)).double().cpu())

    def _count(self) -> int:
        return sum(len(s) for s in self.scores)

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        s = torch.cat(self.scores).numpy()
        return {"clip_score": counts(index_sets, len(s)) @ s / len(s)}

    def result(self) -> Mapping[str, Value]:
        s = torch.cat(self.scores)
        se = float(s.std() / math.sqrt(len(s))) if len(s) > 1 else None
        score = Value(float(s.mean()), higher_is_better=True, std=se, n=len(s), title="CLIP score")
        return {"clip_score": score}


METRIC = Metric(
    "clip",
    ClipScore,
    "CLIP score: 100 x cosine of each sample and its prompt, mean (a local CLIP checkpoint: "
    "--metric-option clip=DIR; models with prompts)",
    applies=clip_applies,
    options={"clip": None},
)
