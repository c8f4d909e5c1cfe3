"""The plugin host: entry-point discovery with pluggy, and the registry plugins fill.

Every distribution that declares an entry point in the group `bench` is a plugin, the
host's own built-ins included. A plugin that fails to import, or implements a hook
that does not exist, is recorded with its error and the rest keep working.
`BENCH_PLUGINS=dist1,dist2` restricts loading to those distributions (the host's
built-ins always load).
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .contracts import NAME_RE, PLUGIN_TYPES
from .errors import PluginError, unknown

GROUP = "bench"
HOST = "sampler-bench"


@dataclass
class PluginInfo:
    """One loaded (or failed) entry point and what it registered."""

    name: str
    dist: str
    version: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class Registry:
    """Everything the plugins registered, by kind and name, with the owning distribution."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {kind: {} for kind in PLUGIN_TYPES}
        self.aliases: dict[str, dict[str, str]] = {kind: {} for kind in PLUGIN_TYPES}  # alias -> name
        self.owner: dict[tuple[str, str], PluginInfo] = {}
        self.plugins: list[PluginInfo] = []
        self.pm: pluggy.PluginManager | None = None

    def get(self, kind: str, name: str) -> Any:
        """The item (by name or alias) or a UsageError listing what exists and the closest match."""
        table = self.items[kind]
        name = self.aliases[kind].get(name, name)
        if name not in table:
            raise unknown(kind.rstrip("s"), name, list(table), self.aliases[kind])
        return table[name]

    def canonical(self, kind: str, name: str) -> str:
        """The registered name an alias stands for (the name itself otherwise)."""
        return self.aliases[kind].get(name, name)

    def names(self, kind: str) -> list[str]:
        return list(self.items[kind])

    def version_of(self, kind: str, name: str) -> str:
        """`dist==version` of the plugin that registered `name`."""
        info = self.owner[(kind, name)]
        return f"{info.dist}=={info.version}"

    def versions(self) -> dict[str, str]:
        return {p.dist: p.version for p in self.plugins if p.error is None}

    def _add(self, kind: str, item: Any, info: PluginInfo) -> None:
        expected = PLUGIN_TYPES[kind]
        if not isinstance(item, expected):
            raise PluginError(
                f"{info.dist} registered a {type(item).__name__} with register_{kind}; "
                f"expected bench.{expected.__name__}"
            )
        if not NAME_RE.match(item.name):
            raise PluginError(f"{info.dist} registered the invalid {kind[:-1]} name '{item.name}'")
        if item.name in self.items[kind]:
            first = self.owner[(kind, item.name)]
            raise PluginError(
                f"{kind[:-1]} '{item.name}' is registered twice: by {first.dist} and by {info.dist}"
            )
        for alias in getattr(item, "aliases", ()):
            taken = alias in self.items[kind] or alias in self.aliases[kind]
            if taken or not NAME_RE.match(alias.replace("_", "-")):
                raise PluginError(f"{info.dist}: alias '{alias}' of {kind[:-1]} '{item.name}' is "
                                  "invalid or taken")
        if item.name in self.aliases[kind]:
            raise PluginError(f"{kind[:-1]} '{item.name}' is already an alias of "
                              f"'{self.aliases[kind][item.name]}'")
        self.items[kind][item.name] = item
        self.aliases[kind].update(dict.fromkeys(getattr(item, "aliases", ()), item.name))
        self.owner[(kind, item.name)] = info
        info.registered.setdefault(kind, []).append(item.name)


def _allowed() -> set[str] | None:
    raw = os.environ.get("BENCH_PLUGINS")
    if raw is None:
        return None
    return {name.strip().lower() for name in raw.split(",") if name.strip()}


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-")


def _entry_points() -> list[md.EntryPoint]:
    seen, out = set(), []
    for ep in md.entry_points(group=GROUP):
        key = (ep.name, ep.value)
        if key not in seen:  # the same distribution found twice on sys.path
            seen.add(key)
            out.append(ep)
    return out


def load_registry() -> Registry:
    """Discover, load and validate every plugin; build a fresh Registry."""
    registry = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry.pm = pm
    allowed = _allowed()
    for ep in _entry_points():
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        if allowed is not None and _norm(dist) != HOST and _norm(dist) not in {
            _norm(a) for a in allowed
        }:
            continue
        info = PluginInfo(name=ep.name, dist=dist, version=version, module=ep.value)
        registry.plugins.append(info)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            info.error = f"import failed: {type(exc).__name__}: {exc}"
            continue
        try:
            pm.register(module, name=f"{dist}:{ep.name}")
            pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            info.error = f"invalid plugin: {exc}"
            continue
        info.module_obj = module  # type: ignore[attr-defined]
    by_module = {id(getattr(p, "module_obj", None)): p for p in registry.plugins}
    for kind in PLUGIN_TYPES:
        hook = getattr(pm.hook, f"register_{kind}")
        for impl in reversed(hook.get_hookimpls()):  # registration order
            info = by_module[id(impl.plugin)]
            try:
                impl.function(register=lambda item, _k=kind, _i=info: registry._add(_k, item, _i))
            except PluginError:
                raise
            except Exception as exc:
                info.error = f"register_{kind} failed: {type(exc).__name__}: {exc}"
    return registry
