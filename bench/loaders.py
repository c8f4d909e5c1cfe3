"""Deprecated since 0.2: `bench.loaders` became one module per model source (bench.models
since 0.3). A factory written for 0.1 (`from bench.loaders import Declared`) still
imports from here, with a DeprecationWarning, until 0.4; new code writes `bench.Declared`.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = {
    "models.arguments": ("PREDICTION_ALIASES", "parse_arg", "split_arg", "class_indices"),
    "models.download": ("TIMEOUT_S", "cache_dir", "offline", "with_deadline", "reason", "open_url", "fetch"),
    "models.edm": ("EDM_URL", "EDM_PRESETS", "EDM_SIGMA_RANGE", "EasyDict", "PersistenceUnpickler",
                    "read_network_pickle", "EDMNetwork", "resolve_edm", "load_edm"),
    "models.diffusers": ("DIFFUSERS_PRESETS", "HF_FILES", "WEIGHTS", "diffusers_layout", "hf_snapshot",
                          "resolve_diffusers", "read_scheduler", "alphas_cumprod", "unet_fn",
                          "load_diffusers"),
    "models.factory": ("Declared", "import_factory", "load_weights", "wrap_declared", "load_factory"),
}
MOVED = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module 'bench.loaders' has no attribute '{name}'")
    module = MOVED[name]
    new = f"bench.{name}" if name == "Declared" else f"bench.{module}.{name}"
    warnings.warn(f"bench.loaders.{name} is deprecated since 0.2; use {new}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(f".{module}", __package__), name)
