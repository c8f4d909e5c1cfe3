"""diffusers: a UNet2DModel with its discrete VP scheduler config, from a local directory
(a pipeline with unet/ and scheduler/, or a flat one), an `owner/repo` id or a preset, read
from the Hugging Face cache or fetched; eps, v or x0 prediction (bench.adapters.DiscreteVP).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters import DiscreteVP
from ..contracts import Denoiser, ModelSource
from ..errors import ModelLoadError, unknown
from . import PREDICTION_ALIASES, class_indices, split_arg
from .download import TIMEOUT_S, offline, open_url, reason

DIFFUSERS_PRESETS = {
    "ddpm-cifar10-32": "google/ddpm-cifar10-32",
    "ddpm-celebahq-256": "google/ddpm-celebahq-256",
    "ddpm-church-256": "google/ddpm-church-256",
    "ddpm-bedroom-256": "google/ddpm-bedroom-256",
    "ddpm-cat-256": "google/ddpm-cat-256",
}

HF_FILES = (
    "model_index.json",
    "config.json",
    "scheduler_config.json",
    "unet/config.json",
    "scheduler/scheduler_config.json",
)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_layout(root: Path) -> tuple[Path, Path]:
    """(unet dir, scheduler config) of a pipeline (unet/, scheduler/) or a flat directory."""
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root / "scheduler" / "scheduler_config.json"
    return root, root / "scheduler_config.json"


def hf_snapshot(repo_id: str, what: str) -> Path:
    """A Hugging Face repository's UNet and scheduler files: from the cache, else fetched."""
    import huggingface_hub as hub

    # Cached: whatever snapshot is on disk
    try:
        return Path(hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and relatives)
        pass
    cache = os.environ.get("HF_HUB_CACHE") or hub.constants.HF_HUB_CACHE
    hint = (
        f"run `hf download {repo_id}` on a connected machine and copy its cache to {cache}, "
        f"or pass a local directory (diffusers:DIR)"
    )
    if offline() or hub.constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{what} is not cached and the Hugging Face hub is offline; {hint}")
    # Online: probe once (the hub client retries for long), list the repository, then
    # fetch one layout's configs and one weights file
    try:
        open_url(f"{hub.constants.ENDPOINT}/api/models/{repo_id}").close()
        files = set(hub.list_repo_files(repo_id))
        prefix = "unet/" if "unet/config.json" in files else ""
        weights = next((prefix + w for w in WEIGHTS if prefix + w in files), None)
        if weights is None:
            raise ModelLoadError(f"{what} has no {' or '.join(WEIGHTS)} under '{prefix or '/'}'")
        wanted = [f for f in HF_FILES if f in files] + [weights]
        return Path(hub.snapshot_download(repo_id, allow_patterns=wanted, etag_timeout=TIMEOUT_S))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{what} is not cached and cannot be fetched ({reason(exc)}); {hint}") from None


def resolve_diffusers(target: str) -> Path:
    """A local directory, a preset or an `owner/repo` id -> a local directory."""
    path = Path(target).expanduser()
    if path.is_dir():
        return path
    if target in DIFFUSERS_PRESETS:
        repo_id = DIFFUSERS_PRESETS[target]
        return hf_snapshot(repo_id, f"diffusers preset '{target}' ({repo_id})")
    if target.count("/") == 1 and not target.startswith((".", "/", "~")):
        return hf_snapshot(target, f"Hugging Face repository '{target}'")
    if "/" in target:
        raise ModelLoadError(f"diffusers: no such directory '{target}'")
    raise unknown("diffusers preset", target, list(DIFFUSERS_PRESETS))


def read_scheduler(config_path: Path) -> Any:
    """The diffusers scheduler named by the config (DDPMScheduler if it names an old class)."""
    import diffusers

    if not config_path.is_file():
        raise ModelLoadError(
            f"diffusers: no scheduler config at {config_path}; save the scheduler "
            "with save_pretrained next to the UNet"
        )
    config = json.loads(config_path.read_text())
    if "timesteps" in config:  # the first diffusers releases' name for num_train_timesteps
        config.setdefault("num_train_timesteps", config.pop("timesteps"))
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = diffusers.DDPMScheduler
    scheduler = cls.from_config(config)
    if getattr(scheduler, "betas", None) is None:
        raise ModelLoadError(f"diffusers: scheduler {cls.__name__} has no betas (not discrete VP)")
    return scheduler


def alphas_cumprod(scheduler: Any) -> Tensor:
    """prod(1 - beta) in float64 (diffusers' float32 product loses sigma_min's digits); a
    zero-terminal-SNR end is floored at 2**-24 as diffusers' Euler schedulers do."""
    a = torch.cumprod(1 - scheduler.betas.double(), dim=0)
    return a.clamp_min(2.0**-24)


def unet_fn(unet: torch.nn.Module, channels: int, label_dim: int, class_label: int | None):
    """net_fn(x_vp, t, **cond) for DiscreteVP: the UNet's first `channels` output channels."""

    def net_fn(x_vp: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        # Class indices for class-conditional UNets unless the caller gives them
        if class_labels is None and label_dim:
            class_labels = class_indices(len(x_vp), label_dim, class_label, x_vp.device)
        out = unet(x_vp.to(unet.dtype), t, class_labels=class_labels, **cond).sample
        return out[:, :channels].to(x_vp.dtype)

    return net_fn


def load_diffusers(arg: str | None, device=None, **_: Any) -> Denoiser:
    """diffusers:DIR|REPO|PRESET[;prediction=P][;class=K] -- UNet2DModel + discrete VP scheduler."""
    from diffusers import UNet2DModel

    target, opts = split_arg("diffusers", arg, {"prediction": None, "class": None})
    unet_dir, scheduler_config = diffusers_layout(resolve_diffusers(target))
    scheduler = read_scheduler(scheduler_config)
    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
    # Prediction type: the option, else the scheduler config's
    prediction = opts["prediction"] or scheduler.config.get("prediction_type", "epsilon")
    prediction = PREDICTION_ALIASES.get(prediction, prediction)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, h, w)
    label_dim = int(unet.config.num_class_embeds or 0)
    if opts["class"] is not None:
        class_indices(1, label_dim, opts["class"], "cpu")
    fn = unet_fn(unet, shape[0], label_dim, opts["class"])
    return DiscreteVP(fn, alphas_cumprod(scheduler), shape, prediction=prediction, net=unet)


SOURCE = ModelSource(
        "diffusers",
        load_diffusers,
        "diffusers UNet2DModel + scheduler config (discrete VP; eps, v or sample): "
        "diffusers:DIR|OWNER/REPO|PRESET[;prediction=P][;class=K]; presets: " + ", ".join(DIFFUSERS_PRESETS),
    )
