"""Deprecated since 0.3: the model sources moved to `bench.models` (edm, diffusers, factory,
download; the argument helpers to bench.models.arguments). `bench.sources` and
`bench.sources.<module>` still import, with a DeprecationWarning, until 0.4; a factory
imports `bench.Declared`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

warnings.warn("bench.sources is deprecated since 0.3; use bench.models (and bench.Declared)",
              DeprecationWarning, stacklevel=2)

# The old submodules are the new ones: `from bench.sources.factory import Declared` still works
for _name in ("edm", "diffusers", "factory", "download"):
    sys.modules.setdefault(f"{__name__}.{_name}", importlib.import_module(f"bench.models.{_name}"))


def __getattr__(name: str) -> Any:
    if name in ("edm", "diffusers", "factory", "download"):
        return sys.modules[f"{__name__}.{name}"]
    arguments = importlib.import_module("bench.models.arguments")
    if hasattr(arguments, name):
        return getattr(arguments, name)
    raise AttributeError(f"module 'bench.sources' has no attribute '{name}'")
