"""edm: NVlabs EDM network pickles (Karras et al. 2022, code release), read by our own
unpickler for the `torch_utils.persistence` format: each persistent object is
`_reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name,
state}; the module source is executed in a fresh module whose `torch_utils` / `dnnlib`
imports resolve to small stand-ins here. A pickle runs code, so loading needs
--trust-pickle. Presets download into the cache; conditional models get class `K`
(`class=K`) or, by default, class `row mod label_dim` for each row of a batch.
"""

from __future__ import annotations

import builtins
import io
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..contracts import Denoiser, ModelSource
from ..errors import ModelLoadError, unknown
from .arguments import class_indices, split_arg
from .download import cache_dir, fetch

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


SOURCE = ModelSource(
        "edm",
        load_edm,
        "NVlabs EDM network pickle: edm:PATH|URL|PRESET[;class=K] (needs --trust-pickle); presets: "
        + ", ".join(EDM_PRESETS),
        options={"trust_pickle": False},
    )
