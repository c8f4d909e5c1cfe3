"""Model sources for the checkpoints people actually use: EDM pickles, diffusers, factories.

The runner splits `--model name:arg` at the first ':'; the arg is a target followed by
`;key=value` options:

    edm:PATH|URL|PRESET[;class=K]                    NVlabs network pickle (needs --trust-pickle)
    diffusers:DIR|OWNER/REPO|PRESET[;prediction=P][;class=K]
    factory:MODULE|FILE.py:FUNCTION[;weights=FILE.safetensors][;key=value...]

EDM pickles are read by our own unpickler for NVlabs' `torch_utils.persistence` format
(Karras et al. 2022, code release): each persistent object is `_reconstruct_persistent_obj(meta)`
with meta = {type, version, module_src, class_name, state}; the module source is executed
in a fresh module whose `torch_utils` / `dnnlib` imports resolve to small stand-ins here.
Presets are downloaded into the cache ($BENCH_CACHE, default ~/.cache/sampler-bench) and
diffusers repositories into the Hugging Face cache; offline, a one-line error says where
to put the file. Conditional models get class `K` (`class=K`) or, by default, class
`row mod label_dim` for each row of a batch (balanced classes when the batch size is a
multiple of label_dim).
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import sys
import threading
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import PREDICTIONS, DiscreteVP, Preconditioned
from .contracts import Denoiser, ModelSource, cast_like, resolve_options
from .errors import ModelLoadError, UsageError, unknown

TIMEOUT_S = 10.0  # connect / read timeout for downloads; never hang offline

EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_PRESETS = {
    stem: f"{EDM_URL}edm-{stem}.pkl"
    for stem in (
        "cifar10-32x32-cond-vp",
        "cifar10-32x32-cond-ve",
        "cifar10-32x32-uncond-vp",
        "cifar10-32x32-uncond-ve",
        "ffhq-64x64-uncond-vp",
        "ffhq-64x64-uncond-ve",
        "afhqv2-64x64-uncond-vp",
        "afhqv2-64x64-uncond-ve",
        "imagenet-64x64-cond-adm",
    )
}
EDM_SIGMA_RANGE = (0.002, 80.0)  # EDM generate.py's defaults, clamped by the network's own

DIFFUSERS_PRESETS = {
    "ddpm-cifar10-32": "google/ddpm-cifar10-32",
    "ddpm-celebahq-256": "google/ddpm-celebahq-256",
    "ddpm-church-256": "google/ddpm-church-256",
    "ddpm-bedroom-256": "google/ddpm-bedroom-256",
    "ddpm-cat-256": "google/ddpm-cat-256",
}
PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# --- Spec arguments, cache, downloads ---------------------------------------------------


def parse_arg(source: str, arg: str | None) -> tuple[str, dict[str, str]]:
    """`target;key=value;...` -> (target, {key: value})."""
    target, *pairs = (arg or "").split(";")
    given = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"model '{source}:{arg}': option '{pair}' is not key=value")
        given[key.strip()] = value.strip()
    if not target.strip():
        raise UsageError(f"model '{source}' needs an argument: write {source}:... (see `bench list models`)")
    return target.strip(), given


def split_arg(source: str, arg: str | None, known: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """`target;key=value;...` -> (target, options cast like `known`'s defaults)."""
    target, given = parse_arg(source, arg)
    return target, resolve_options("model", source, known, given)


def cache_dir() -> Path:
    """Where downloads go: $BENCH_CACHE, else ~/.cache/sampler-bench."""
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "sampler-bench")


def offline() -> bool:
    return os.environ.get("BENCH_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() in a daemon thread, abandoned after `seconds` (DNS lookups ignore socket timeouts)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def reason(exc: BaseException) -> str:
    """A network error in a few words."""
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def open_url(url: str) -> Any:
    """urlopen with a short timeout and an overall deadline; no retries."""
    return with_deadline(lambda: urllib.request.urlopen(url, timeout=TIMEOUT_S), TIMEOUT_S)


def fetch(url: str, dest: Path, what: str) -> Path:
    """`dest` if cached, else downloaded from `url` with a short timeout; errors in one line."""
    if dest.is_file():
        return dest
    hint = f"download {url} and put it at {dest}"
    if offline():
        raise ModelLoadError(f"{what} is not cached and BENCH_OFFLINE is set; {hint}")
    # Connect within the deadline, then stream into a partial file renamed when complete
    part = dest.with_name(dest.name + ".part")
    try:
        response = open_url(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        with response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        os.replace(part, dest)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        part.unlink(missing_ok=True)
        raise ModelLoadError(f"{what} is not cached and cannot be fetched ({reason(exc)}); {hint}") from None
    return dest


# --- Class labels -----------------------------------------------------------------------


def class_indices(n: int, label_dim: int, fixed: int | None, device) -> Tensor:
    """Class `fixed` for every row, else row mod label_dim."""
    if fixed is not None and not label_dim:
        raise UsageError(f"class={fixed} given but the model is unconditional; drop the class option")
    if fixed is not None and not 0 <= fixed < label_dim:
        raise UsageError(f"class={fixed} is out of range; the model has classes 0..{label_dim - 1}")
    rows = torch.arange(n, device=device)
    return torch.full_like(rows, fixed) if fixed is not None else rows % label_dim


# --- EDM / NVlabs persistence pickles ---------------------------------------------------


class EasyDict(dict):
    """Stand-in for dnnlib.EasyDict: a dict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _unavailable(module: str) -> types.ModuleType:
    """A stand-in module whose attributes fail when used, naming what is missing."""
    stub = types.ModuleType(module)

    def getattr_(name: str) -> Any:
        raise ModelLoadError(f"{module}.{name} is NVlabs code that sampler-bench does not provide")

    stub.__getattr__ = getattr_  # type: ignore[method-assign]
    return stub


def _stand_ins() -> dict[str, types.ModuleType]:
    """`torch_utils`, `torch_utils.persistence`, `torch_utils.misc`, `dnnlib` for pickled code."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls  # classes are rebuilt, not re-pickled
    persistence.import_hook = lambda hook: hook
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence, torch_utils.misc = persistence, _unavailable("torch_utils.misc")
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.EasyDict, dnnlib.util = EasyDict, types.ModuleType("dnnlib.util")
    dnnlib.util.EasyDict = EasyDict
    return {
        "torch_utils": torch_utils,
        "torch_utils.persistence": persistence,
        "torch_utils.misc": torch_utils.misc,
        "dnnlib": dnnlib,
        "dnnlib.util": dnnlib.util,
    }


def _load_storage(b: bytes) -> Any:
    """torch.storage._load_from_bytes, mapped to the CPU (snapshots may come from a GPU)."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class PersistenceUnpickler(pickle.Unpickler):
    """Reads pickles written by NVlabs' torch_utils.persistence without NVlabs' code.

    Each distinct module source is executed once into a fresh module (so classes shared
    by many objects stay identical for isinstance); its imports of `torch_utils` and
    `dnnlib` resolve to stand-ins, everything else to the installed packages.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.stand_ins = _stand_ins()
        self.modules: dict[str, types.ModuleType] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return self.reconstruct
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage
        if module in self.stand_ins:
            return getattr(self.stand_ins[module], name)
        return super().find_class(module, name)

    def _import(self, name: str, globals=None, locals=None, fromlist=(), level=0) -> Any:
        root = name.partition(".")[0]
        if level == 0 and root in self.stand_ins:
            return self.stand_ins.get(name if fromlist else root) or _unavailable(name)
        return builtins.__import__(name, globals, locals, fromlist, level)

    def module_from_source(self, src: str) -> types.ModuleType:
        if src not in self.modules:
            module = types.ModuleType(f"_bench_persistent_{len(self.modules)}")
            module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": self._import}
            exec(compile(src, f"<pickled module {len(self.modules)}>", "exec"), module.__dict__)
            self.modules[src] = module
        return self.modules[src]

    def reconstruct(self, meta: Mapping[str, Any]) -> Any:
        """_reconstruct_persistent_obj(meta): rebuild the class from its source, then its state."""
        if meta.get("type") != "class" or "module_src" not in meta:
            raise ModelLoadError(f"persistent object of type '{meta.get('type')}' is not supported")
        cls = self.module_from_source(meta["module_src"]).__dict__[meta["class_name"]]
        obj = cls.__new__(cls)
        state = dict(meta.get("state") or {})
        if callable(getattr(obj, "__setstate__", None)):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj


def read_network_pickle(path: Path) -> torch.nn.Module:
    """The EMA network of a `network-snapshot-*.pkl` (or a pickled module itself)."""
    with open(path, "rb") as f:
        data = PersistenceUnpickler(f).load()
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, torch.nn.Module):
        raise ModelLoadError(f"{path} holds no network: expected a dict with 'ema' or a torch module")
    return net


class EDMNetwork(Denoiser):
    """An EDM preconditioned network (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) as a
    Denoiser: it already computes D(x, sigma, class_labels) (Karras et al. 2022, Table 1).

    The sigma range is EDM generate.py's [0.002, 80] clamped to the network's own.
    """

    def __init__(self, net: torch.nn.Module, *, class_label: int | None = None, origin: str = "") -> None:
        super().__init__()
        self.net, self.origin, self.class_label = net, origin, class_label
        self.label_dim = int(getattr(net, "label_dim", 0))
        self.shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.sigma_min = max(EDM_SIGMA_RANGE[0], float(getattr(net, "sigma_min", 0)))
        self.sigma_max = min(EDM_SIGMA_RANGE[1], float(getattr(net, "sigma_max", float("inf"))))
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))
        if class_label is not None:
            class_indices(1, self.label_dim, class_label, "cpu")

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        # One-hot labels for conditional networks unless the caller gives them
        if class_labels is None and self.label_dim:
            rows = class_indices(len(x), self.label_dim, self.class_label, x.device)
            class_labels = torch.nn.functional.one_hot(rows, self.label_dim).float()
        return self.net(x, sigma, class_labels=class_labels, **cond).to(x.dtype)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        round_sigma = getattr(self.net, "round_sigma", torch.as_tensor)
        return torch.as_tensor(round_sigma(torch.as_tensor(sigma)))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "edm",
            "network": type(self.net).__name__,
            "label_dim": self.label_dim,
            "class": self.class_label,
            "file": self.origin,
        }


def resolve_edm(target: str) -> tuple[Path, str]:
    """A local file, a URL or a preset name -> (local path, description)."""
    path = Path(target).expanduser()
    if path.is_file():
        return path, str(path)
    if target.startswith(("http://", "https://")):
        return fetch(target, cache_dir() / "edm" / target.rsplit("/", 1)[-1], f"'{target}'"), target
    if target in EDM_PRESETS:
        url = EDM_PRESETS[target]
        return fetch(url, cache_dir() / "edm" / url.rsplit("/", 1)[-1], f"EDM preset '{target}'"), url
    if "/" in target or target.endswith(".pkl"):
        raise ModelLoadError(f"edm: no such file '{target}'")
    raise unknown("EDM preset", target, list(EDM_PRESETS))


def load_edm(arg: str | None, device=None, trust_pickle: bool = False, **_: Any) -> Denoiser:
    """edm:PATH|URL|PRESET[;class=K] -- an NVlabs network pickle; needs trust_pickle."""
    target, opts = split_arg("edm", arg, {"class": None})
    if not trust_pickle:
        raise ModelLoadError(
            f"edm:{target} is a pickle, which runs code when loaded; "
            "add --trust-pickle only for files you trust"
        )
    path, origin = resolve_edm(target)
    return EDMNetwork(read_network_pickle(path), class_label=opts["class"], origin=origin).eval()


# --- diffusers: UNet2DModel + scheduler config ------------------------------------------


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


# --- Python factories -------------------------------------------------------------------


@dataclass
class Declared:
    """What a `module:function` factory returns: a network and how to read it.

    kind: "edm" (F-prediction, EDM preconditioning), "vp" (continuous VP time axis
    (M - 1) t, prediction eps / v / x0), "ve" (D = x + sigma F, NCSN++) or "discrete"
    (DDPM integer timesteps with `alphas_cumprod`, prediction eps / v / x0). The network is
    called as net(x_in, c_noise, **cond), or net(x_vp, t, **cond) when discrete;
    `has_bottleneck` as in bench.adapters.Preconditioned (continuous kinds).
    """

    net: torch.nn.Module
    shape: tuple[int, int, int]
    kind: str = "edm"
    prediction: str = "epsilon"
    sigma_data: float = 0.5
    sigma_min: float | None = None
    sigma_max: float | None = None
    alphas_cumprod: Tensor | None = None
    has_bottleneck: bool = False


def import_factory(target: str) -> Callable[..., Any]:
    """`pkg.mod:fn` or `path/to/file.py:fn` -> the function."""
    module_name, sep, fn_name = target.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UsageError(f"factory '{target}' is not module:function (e.g. factory:mypkg.nets:build)")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(
                f"bench_factory_{Path(module_name).stem}", module_name
            )
            if spec is None or not Path(module_name).is_file():
                raise ModelLoadError(f"factory: no such file '{module_name}'")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickling look modules up there
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"factory: cannot import '{module_name}' ({exc})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"factory: '{module_name}' has no function '{fn_name}'")
    return fn


def load_weights(net: torch.nn.Module, path: str) -> None:
    """Load a safetensors state dict into `net`, every key matching."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelLoadError(f"factory: no such weights file '{path}'")
    try:
        result = net.load_state_dict(load_file(path), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"factory: weights {path} do not match the network: {reason(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"factory: weights {path} do not match the network: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def wrap_declared(declared: Declared) -> Denoiser:
    """The Denoiser for a declared network (bench.adapters)."""
    kind = declared.kind
    if kind not in ("edm", "vp", "ve", "discrete"):
        raise UsageError(f"factory: unknown kind '{kind}'; use edm, vp, ve or discrete")
    prediction = PREDICTION_ALIASES.get(declared.prediction, declared.prediction)
    if prediction not in PREDICTIONS:
        raise UsageError(f"factory: unknown prediction '{declared.prediction}'; use eps, v or x0")
    if kind == "discrete":
        if declared.alphas_cumprod is None:
            raise UsageError("factory: kind 'discrete' needs alphas_cumprod")
        return DiscreteVP(
            declared.net,
            declared.alphas_cumprod,
            declared.shape,
            prediction=prediction,
            net=declared.net,
            sigma_data=declared.sigma_data,
        )
    if kind in ("edm", "ve") and prediction != "epsilon":
        raise UsageError(f"factory: kind '{kind}' has its own output F; prediction is for vp and discrete")
    return Preconditioned(
        declared.net,
        kind,
        declared.shape,
        sigma_data=declared.sigma_data,
        prediction=prediction,
        sigma_min=declared.sigma_min,
        sigma_max=declared.sigma_max,
        has_bottleneck=declared.has_bottleneck,
    )


def load_factory(arg: str | None, device=None, **_: Any) -> Denoiser:
    """factory:MODULE:FUNCTION[;weights=FILE.safetensors][;key=value...] -- a Python factory."""
    target, given = parse_arg("factory", arg)
    weights = given.pop("weights", None)
    kwargs = {k: cast_like(None, v, f"factory option '{k}'") for k, v in given.items()}
    made = import_factory(target)(**kwargs)
    # A ready Denoiser, a Declared or a dict of Declared's fields
    if isinstance(made, Denoiser):
        if weights:
            load_weights(made, weights)
        return made
    if isinstance(made, Mapping):
        names = {f.name for f in fields(Declared)}
        if not {"net", "shape"} <= set(made) or set(made) - names:
            raise ModelLoadError(
                f"factory {target} returned a dict; its keys must be among "
                f"{sorted(names)}, with net and shape"
            )
        made = Declared(**made)
    if not isinstance(made, Declared):
        raise ModelLoadError(
            f"factory {target} returned {type(made).__name__}; return a "
            "bench.Denoiser, a bench.loaders.Declared or a dict of its fields"
        )
    if weights:
        load_weights(made.net, weights)
    return wrap_declared(made)


SOURCES = (
    ModelSource(
        "edm",
        load_edm,
        "NVlabs EDM network pickle: edm:PATH|URL|PRESET[;class=K] (needs --trust-pickle); presets: "
        + ", ".join(EDM_PRESETS),
        options={"trust_pickle": False},
    ),
    ModelSource(
        "diffusers",
        load_diffusers,
        "diffusers UNet2DModel + scheduler config (discrete VP; eps, v or sample): "
        "diffusers:DIR|OWNER/REPO|PRESET[;prediction=P][;class=K]; presets: " + ", ".join(DIFFUSERS_PRESETS),
    ),
    ModelSource(
        "factory",
        load_factory,
        "Python factory returning a network and its parameterization: "
        "factory:MODULE|FILE.py:FUNCTION[;weights=FILE.safetensors][;key=value]",
    ),
)
