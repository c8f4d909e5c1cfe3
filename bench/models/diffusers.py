"""diffusers: checkpoints from a local directory, an `owner/repo` id or a preset, read from the
Hugging Face cache or fetched, in two families:

- a pixel-space UNet2DModel with its discrete VP scheduler config (a pipeline with unet/
  and scheduler/, or a flat directory); eps, v or x0 prediction (bench.adapters.DiscreteVP);
- a latent text-to-image pipeline saved whole (model_index.json): Stable-Diffusion-style
  (UNet2DConditionModel, CLIP, AutoencoderKL, a DDPM-family scheduler; DiscreteVP) or SD3
  (SD3Transformer2DModel, its CLIP encoders and the optional T5, FlowMatchEulerDiscrete-
  Scheduler; bench.adapters.Flow on t x 1000). The latent is (C, H/f, W/f) for the VAE's
  factor f at `resolution=`; `decode` runs the VAE and returns images in [-1, 1]; every
  prompt of the run's set is encoded once at load and `select` gives sample i prompt
  i mod n (bench.conditioning). `conditioning` exposes the batch's and the unconditional
  embeddings for the `cfg` modifier (bench.conditioning).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters import DiscreteVP, Flow
from ..conditioning import prompt_rows, prompts_digest, read_prompts
from ..contracts import Denoiser, ModelSource
from ..errors import ModelLoadError, UsageError, unknown
from .arguments import PREDICTION_ALIASES, class_indices, split_arg
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

# The latent pipelines this source runs: class -> time (discrete VP or flow)
PIPELINES = {"StableDiffusionPipeline": "vp", "StableDiffusion3Pipeline": "flow"}
# A pipeline's parts it loads from the hub, and those it never needs
COMPONENTS = ("unet", "transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3")
SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")
VARIANTS = (".fp16.", ".bf16.", ".non_ema.", ".ema.")
OPTIONS = {"prediction": None, "class": None, "resolution": None, "shift": None}
ENCODE_BATCH = 32  # prompts per text-encoder call at load
DECODE_BATCH = 8  # latents per VAE call


# --- Finding the files ------------------------------------------------------------------


def diffusers_layout(root: Path) -> tuple[Path, Path]:
    """(unet dir, scheduler config) of a pipeline (unet/, scheduler/) or a flat directory."""
    if (root / "unet" / "config.json").is_file():
        return root / "unet", root / "scheduler" / "scheduler_config.json"
    return root, root / "scheduler_config.json"


def unet_files(files: set[str], what: str) -> list[str]:
    """A UNet2DModel repository's configs and one weights file."""
    prefix = "unet/" if "unet/config.json" in files else ""
    weights = next((prefix + w for w in WEIGHTS if prefix + w in files), None)
    if weights is None:
        raise ModelLoadError(f"{what} has no {' or '.join(WEIGHTS)} under '{prefix or '/'}'")
    return [f for f in HF_FILES if f in files] + [weights]


def pipeline_files(files: set[str]) -> list[str]:
    """A latent pipeline's model_index.json and, per component it needs, its configs,
    tokenizer files and full-precision weights (all shards; .bin where no .safetensors)."""
    wanted = ["model_index.json"]
    for part in COMPONENTS:
        mine = sorted(f for f in files if f.startswith(part + "/") and f.count("/") == 1
                      and not any(v in f for v in VARIANTS))
        wanted += [f for f in mine if f.endswith((".json", ".txt", ".model"))]
        safetensors = [f for f in mine if f.endswith(".safetensors")]
        wanted += safetensors or [f for f in mine if f.endswith(".bin")]
    return wanted


def is_pipeline(files: set[str]) -> bool:
    """A latent pipeline saved whole (its text encoder beside the network)."""
    return "model_index.json" in files and any(f.startswith(("text_encoder/", "transformer/")) for f in files)


def hf_snapshot(repo_id: str, what: str) -> Path:
    """A Hugging Face repository's files for this source: from the cache, else fetched."""
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
    # fetch one layout's configs and weights
    try:
        open_url(f"{hub.constants.ENDPOINT}/api/models/{repo_id}").close()
        files = set(hub.list_repo_files(repo_id))
        wanted = pipeline_files(files) if is_pipeline(files) else unet_files(files, what)
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


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON config, or None where there is none."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        raise ModelLoadError(f"diffusers: {path} is not valid JSON; save it again with save_pretrained") \
            from None


def network_class(root: Path, index: dict[str, Any] | None) -> str | None:
    """The class of the denoising network: model_index.json's unet/transformer entry, else
    the UNet config's `_class_name`."""
    for part in ("unet", "transformer"):
        entry = (index or {}).get(part)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            return str(entry[1])
    unet_dir, _ = diffusers_layout(root)
    return (read_json(unet_dir / "config.json") or {}).get("_class_name")


# --- Pixel-space UNet2DModel ----------------------------------------------------------------


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
    return vp_scheduler(cls.from_config(config))


def vp_scheduler(scheduler: Any) -> Any:
    """The scheduler, checked to be discrete VP (it has betas)."""
    if getattr(scheduler, "betas", None) is None:
        name = type(scheduler).__name__
        raise ModelLoadError(f"diffusers: scheduler {name} has no betas (not discrete VP)")
    return scheduler


def alphas_cumprod(scheduler: Any) -> Tensor:
    """prod(1 - beta) in float64 (diffusers' float32 product loses sigma_min's digits); a
    zero-terminal-SNR end is floored at 2**-24 as diffusers' Euler schedulers do."""
    a = torch.cumprod(1 - scheduler.betas.double(), dim=0)
    return a.clamp_min(2.0**-24)


def vp_prediction(option: str | None, scheduler: Any) -> str:
    """The prediction type: the option, else the scheduler config's."""
    prediction = option or scheduler.config.get("prediction_type", "epsilon")
    return PREDICTION_ALIASES.get(prediction, prediction)


def dtype_of(net: torch.nn.Module) -> torch.dtype:
    """The network's weight dtype from its first parameter (diffusers' `dtype` property
    walks every parameter, a cost on each call of a small network)."""
    return next(net.parameters()).dtype


def unet_fn(unet: torch.nn.Module, channels: int, label_dim: int, class_label: int | None):
    """net_fn(x_vp, t, **cond) for DiscreteVP: the UNet's first `channels` output channels."""

    def net_fn(x_vp: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        # Class indices for class-conditional UNets unless the caller gives them
        if class_labels is None and label_dim:
            class_labels = class_indices(len(x_vp), label_dim, class_label, x_vp.device)
        out = unet(x_vp.to(dtype_of(unet)), t, class_labels=class_labels, **cond).sample
        return out[:, :channels].to(x_vp.dtype)

    return net_fn


def load_unet(root: Path, opts: dict[str, Any]) -> Denoiser:
    """A pixel-space UNet2DModel with its discrete VP scheduler."""
    from diffusers import UNet2DModel

    only_for(opts, ("resolution", "shift"), "latent pipelines")
    unet_dir, scheduler_config = diffusers_layout(root)
    scheduler = read_scheduler(scheduler_config)
    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (unet.config.in_channels, h, w)
    label_dim = int(unet.config.num_class_embeds or 0)
    if opts["class"] is not None:
        class_indices(1, label_dim, opts["class"], "cpu")
    fn = unet_fn(unet, shape[0], label_dim, opts["class"])
    prediction = vp_prediction(opts["prediction"], scheduler)
    return DiscreteVP(fn, alphas_cumprod(scheduler), shape, prediction=prediction, net=unet)


def only_for(opts: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    """A UsageError for an option given to a model it does not apply to."""
    for name in names:
        if opts[name] is not None:
            raise UsageError(f"model option '{name}' applies to {where} only; drop ;{name}={opts[name]}")


# --- Latent text-to-image pipelines ---------------------------------------------------------


class TextLatent:
    """What a latent text-to-image model adds to its adapter (a mixin before DiscreteVP or
    Flow): each sample's prompt embedding, the unconditional one, and the VAE decode.

    `select(indices)` fixes the batch's rows (prompt i mod n for sample i); a call without
    conditioning keywords uses them (rows 0..B-1 for a batch nothing selected, e.g. the
    warm-up call). `conditioning(n, unconditional)` gives the keywords to the cfg modifier.
    """

    def attach(self, vae: torch.nn.Module, embeds: dict[str, Tensor], uncond: dict[str, Tensor],
               prompts: tuple[str, ...], info: dict[str, Any]) -> None:
        self.vae, self.prompts, self.info = vae.eval(), prompts, info
        self.cond_keys = tuple(embeds)
        for key in self.cond_keys:  # buffers: they follow the model's device
            self.register_buffer(f"prompt_{key}", embeds[key], persistent=False)
            self.register_buffer(f"uncond_{key}", uncond[key], persistent=False)
        self.rows: Tensor | None = None
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    def select(self, indices: Tensor) -> None:
        self.rows = prompt_rows(indices, len(self.prompts))

    def conditioning(self, n: int, unconditional: bool = False) -> dict[str, Tensor]:
        """The network keywords for the current batch's n rows, or the unconditional ones."""
        # The empty prompt's embedding, broadcast to the batch
        if unconditional:
            tables = {k: getattr(self, f"uncond_{k}") for k in self.cond_keys}
            return {k: u.expand(n, *u.shape[1:]) for k, u in tables.items()}
        # The selected batch's prompts, or prompts 0..n-1 mod len for a batch nothing selected
        selected = self.rows is not None and len(self.rows) == n
        rows = self.rows if selected else prompt_rows(torch.arange(n), len(self.prompts))
        tables = {k: getattr(self, f"prompt_{k}") for k in self.cond_keys}
        return {k: table[rows.to(table.device)] for k, table in tables.items()}

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return super().forward(x, sigma, **(cond or self.conditioning(len(x))))

    def decode(self, x0: Tensor) -> Tensor:
        """The VAE's images of the latents, in [-1, 1] (diffusers' unscaling: z / scale + shift)."""
        images = []
        for z in (x0 / self.scaling_factor + self.shift_factor).split(DECODE_BATCH):
            images.append(self.vae.decode(z.to(dtype_of(self.vae))).sample.to(x0.dtype))
        return torch.cat(images).clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info, "latent_shape": list(self.shape),
                "prompts": {"count": len(self.prompts), "digest": prompts_digest(self.prompts)}}


class LatentVP(TextLatent, DiscreteVP):
    """A Stable-Diffusion-style latent model: DiscreteVP on the text-conditional UNet."""


class LatentFlow(TextLatent, Flow):
    """An SD3-style latent flow model: Flow (t x 1000) on the text-conditional transformer."""


@contextlib.contextmanager
def quiet_libraries():
    """diffusers' and transformers' progress bars and warnings (a prompt truncated to the
    text encoder's length, as the pipelines truncate it) off while a pipeline loads."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in levels:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level in levels:
            lib.set_verbosity(level)
            lib.enable_progress_bar()


def load_pipeline(root: Path, index: dict[str, Any], device) -> Any:
    """The saved pipeline, without the parts sampling never uses (safety checker, ...)."""
    import diffusers

    name = str(index.get("_class_name"))
    if name not in PIPELINES:
        raise ModelLoadError(f"diffusers: pipeline {name} is not supported; latent pipelines supported: "
                             f"{', '.join(PIPELINES)}")
    cls = getattr(diffusers, name)
    # Parts saved as None (an SD3 without T5) and parts sampling never uses are not loaded
    skip = {part: None for part, entry in index.items()
            if part in SKIPPED or (isinstance(entry, list) and entry[:1] == [None])}
    if "requires_safety_checker" in index:
        skip["requires_safety_checker"] = False
    low_mem = importlib.util.find_spec("accelerate") is not None
    pipe = cls.from_pretrained(root, low_cpu_mem_usage=low_mem, **skip)
    return pipe.to(device if device is not None else "cpu")


def encode_prompts(pipe: Any, prompts: list[str]) -> dict[str, Tensor]:
    """The network keywords of each prompt, as the pipeline's own encode_prompt makes them
    (SD: encoder_hidden_states; SD3: those and pooled_projections), in batches."""
    parts: list[dict[str, Tensor]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[start:start + ENCODE_BATCH]
            if type(pipe).__name__ == "StableDiffusion3Pipeline":
                embeds, _, pooled, _ = pipe.encode_prompt(chunk, None, None,
                                                          do_classifier_free_guidance=False)
                parts.append({"encoder_hidden_states": embeds, "pooled_projections": pooled})
            else:
                embeds, _ = pipe.encode_prompt(chunk, pipe.device, 1, False)
                parts.append({"encoder_hidden_states": embeds})
    return {k: torch.cat([p[k] for p in parts]).float().clone() for k in parts[0]}


def parse_resolution(text: Any, default: tuple[int, int], multiple: int) -> tuple[int, int]:
    """`resolution=N` or `HxW` in pixels, each a multiple of `multiple`; else the default."""
    if text is None:
        return default
    parts = str(text).lower().split("x")
    if not (1 <= len(parts) <= 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts)):
        raise UsageError(f"model option resolution={text}: write N or HxW in pixels, e.g. resolution=512")
    h, w = (int(parts[0]), int(parts[-1]))
    if h % multiple or w % multiple:
        raise UsageError(f"model option resolution={text}: height and width must be multiples of {multiple}")
    return h, w


def latent_geometry(pipe: Any, net: torch.nn.Module, option: Any) -> tuple[tuple[int, int, int], dict]:
    """(C, H/f, W/f) for the VAE's factor f at the resolution asked (default: the network's
    sample_size x f), and what describe() records of it."""
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = int(getattr(net.config, "patch_size", None) or 1)
    size = net.config.sample_size
    default = tuple(s * f for s in ((size, size) if isinstance(size, int) else size))
    h, w = parse_resolution(option, default, f * patch)
    info = {"resolution": [h, w], "vae": {"class": type(pipe.vae).__name__, "factor": f,
                                           "scaling_factor": pipe.vae.config.scaling_factor,
                                           "shift_factor": getattr(pipe.vae.config, "shift_factor", None)}}
    return (int(net.config.in_channels), h // f, w // f), info


def flow_shift(config: Any, seq_len: int, option: float | None) -> float:
    """The flow schedule's shift: the option, else the config's `shift`, or with
    `use_dynamic_shifting` exp(mu) for mu interpolated in the image's token count (Flux's
    and SD3.5's rule, diffusers' calculate_shift; `linear` time shifting uses mu itself)."""
    if option is not None:
        if not (math.isfinite(option) and option > 0):
            raise UsageError(f"model option shift={option} must be a positive number, e.g. shift=3.0")
        return float(option)
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (seq_len - lo) / (hi - lo)
    return mu if config.get("time_shift_type") == "linear" else math.exp(mu)


def vp_model(pipe: Any, shape, prediction: str | None) -> tuple[Denoiser, dict[str, Any]]:
    """DiscreteVP on the text-conditional UNet and its DDPM-family scheduler."""
    unet, scheduler = pipe.unet.eval(), vp_scheduler(pipe.scheduler)
    channels = shape[0]

    def net_fn(x_vp: Tensor, t: Tensor, **cond: Any) -> Tensor:
        dtype = dtype_of(unet)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        return unet(x_vp.to(dtype), t, **cond).sample[:, :channels].to(x_vp.dtype)

    prediction = vp_prediction(prediction, scheduler)
    model = LatentVP(net_fn, alphas_cumprod(scheduler), shape, prediction=prediction, net=unet)
    return model, {"scheduler": type(scheduler).__name__,
                   "beta_schedule": scheduler.config.get("beta_schedule")}


def flow_model(pipe: Any, shape, prediction: str | None, shift: float | None) -> tuple[Denoiser, dict]:
    """Flow (velocity on t x num_train_timesteps) on the transformer, its shift the preferred
    `flow` schedule's; t_min is the scheduler's last trained t, shifted."""
    net, config = pipe.transformer.eval(), pipe.scheduler.config
    patch = int(getattr(net.config, "patch_size", None) or 1)
    s = flow_shift(config, (shape[1] // patch) * (shape[2] // patch), shift)
    steps = int(config.get("num_train_timesteps", 1000))
    t_min = s / steps / (1 + (s - 1) / steps)
    prediction = {"v": "velocity", "x0": "sample", "eps": "epsilon"}.get(prediction, prediction)

    def net_fn(x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        dtype = dtype_of(net)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        out = net(hidden_states=x_t.to(dtype), timestep=t.to(dtype), return_dict=False, **cond)[0]
        return out.to(x_t.dtype)

    model = LatentFlow(net_fn, shape, prediction=prediction or "velocity", net=net, time_scale=float(steps),
                       t_min=t_min, default_schedule=f"flow:shift={s:.6g}")
    return model, {"scheduler": type(pipe.scheduler).__name__, "shift": s,
                   "dynamic_shifting": bool(config.get("use_dynamic_shifting"))}


def load_latent(root: Path, index: dict[str, Any], opts: dict[str, Any], prompts: tuple[str, ...],
                device) -> Denoiser:
    """A latent text-to-image pipeline: its network adapted, every prompt encoded once."""
    only_for(opts, ("class",), "class-conditional UNet2DModels")
    if opts["shift"] is not None and PIPELINES.get(str(index.get("_class_name"))) != "flow":
        raise UsageError(f"model option 'shift' applies to flow pipelines only; drop ;shift={opts['shift']}")
    with quiet_libraries():
        pipe = load_pipeline(root, index, device)
        time = PIPELINES[type(pipe).__name__]
        net = pipe.unet if time == "vp" else pipe.transformer
        shape, info = latent_geometry(pipe, net, opts["resolution"])
        # Every prompt and the empty one encoded once; the text encoders go with the pipeline
        embeds, uncond = encode_prompts(pipe, list(prompts)), encode_prompts(pipe, [""])
    if time == "vp":
        model, more = vp_model(pipe, shape, opts["prediction"])
    else:
        model, more = flow_model(pipe, shape, opts["prediction"], opts["shift"])
    model.attach(pipe.vae, embeds, uncond, prompts, {"pipeline": type(pipe).__name__, **info, **more})
    return model


def load_diffusers(arg: str | None, device=None, prompts: str | None = None, **_: Any) -> Denoiser:
    """diffusers:DIR|REPO|PRESET[;prediction=P][;class=K][;resolution=N|HxW][;shift=S]."""
    target, opts = split_arg("diffusers", arg, OPTIONS)
    root = resolve_diffusers(target)
    index = read_json(root / "model_index.json")
    network = network_class(root, index)
    if network in (None, "UNet2DModel"):
        return load_unet(root, opts)
    if index is None or not any(k.startswith("text_encoder") for k in index):
        raise ModelLoadError(f"diffusers: {root} holds a {network} without its pipeline; save the whole "
                             "pipeline (text encoder, tokenizer, VAE, scheduler) with save_pretrained")
    return load_latent(root, index, opts, read_prompts(prompts), device)


SOURCE = ModelSource(
    "diffusers",
    load_diffusers,
    "diffusers: UNet2DModel + discrete VP scheduler, or a latent text-to-image pipeline (Stable Diffusion, "
    "SD3; prompts from --prompts, guidance with cfg): diffusers:DIR|OWNER/REPO|PRESET[;prediction=P]"
    "[;class=K][;resolution=N|HxW][;shift=S]; presets: " + ", ".join(DIFFUSERS_PRESETS),
    options={"prompts": None},
)
