"""The plugin host: entry-point discovery with pluggy, and the registry plugins fill.

Every distribution that declares an entry point in the group `bench` is a plugin, the
host's own built-ins included. A plugin that fails to import, or implements a hook
that does not exist, is recorded with its error and the rest keep working.
`BENCH_PLUGINS=dist1,dist2` restricts loading to those distributions (the host's
built-ins always load).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, unknown

GROUP = "bench"
HOST = "sampler-bench"
KINDS = ("samplers", "schedules", "models", "modifiers", "metrics", "reporters")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+_-]*$")


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
    """Everything the plugins registered, by kind and name, with the owning distribution.

    Loading imports the plugins' entry modules only; the `register_*` hooks run when an item
    is first asked for, so a command that needs none (`bench --help`) imports no torch.
    """

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}  # alias -> name
        self.owner: dict[tuple[str, str], PluginInfo] = {}
        self._plugins: list[PluginInfo] = []
        self.pm: pluggy.PluginManager | None = None
        self._filled: set[str] = set(KINDS)  # a Registry built by hand is filled by hand

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        self.fill()
        return self._items

    @property
    def aliases(self) -> dict[str, dict[str, str]]:
        self.fill()
        return self._aliases

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every loaded (or failed) plugin, with what it registered."""
        self.fill()
        return self._plugins

    def table(self, kind: str) -> dict[str, Any]:
        """The registered items of one kind: only that kind's hooks run (`bench list samplers`
        imports no metric's or model's module)."""
        self.fill((kind,))
        return self._items[kind]

    def fill(self, kinds: tuple[str, ...] = KINDS) -> None:
        """Run every plugin's register_<kind> hooks for `kinds`, once each; a failing hook is that
        plugin's error."""
        todo = [kind for kind in kinds if kind not in self._filled]
        if not todo or self.pm is None:
            return
        self._filled.update(todo)
        by_module = {id(getattr(p, "module_obj", None)): p for p in self._plugins}
        for kind in todo:
            hook = getattr(self.pm.hook, f"register_{kind}")
            for impl in reversed(hook.get_hookimpls()):  # registration order
                info = by_module[id(impl.plugin)]
                try:
                    impl.function(register=lambda item, _k=kind, _i=info: self._add(_k, item, _i))
                except (Exception, SystemExit, KeyboardInterrupt) as exc:
                    info.error = f"register_{kind} failed: {failure(exc)}"

    def add_commands(self, subparsers: Any) -> None:
        """Every plugin's `register_commands(subparsers)`; one that raises is that plugin's error
        (`bench plugins` shows it) and its commands are left out, the others stay."""
        if self.pm is None:
            return
        by_module = {id(getattr(p, "module_obj", None)): p for p in self._plugins}
        for impl in reversed(self.pm.hook.register_commands.get_hookimpls()):
            try:
                impl.function(subparsers=subparsers)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                info = by_module.get(id(impl.plugin))
                if info is not None:
                    info.error = f"register_commands failed: {failure(exc)}"

    def get(self, kind: str, name: str) -> Any:
        """The item (by name or alias) or a UsageError listing what exists and the closest match."""
        table = self.table(kind)
        name = self._aliases[kind].get(name, name)
        if name not in table:
            raise unknown(kind.rstrip("s"), name, list(table), self._aliases[kind])
        return table[name]

    def canonical(self, kind: str, name: str) -> str:
        """The registered name an alias stands for (the name itself otherwise)."""
        self.fill((kind,))
        return self._aliases[kind].get(name, name)

    def names(self, kind: str) -> list[str]:
        return list(self.table(kind))

    def version_of(self, kind: str, name: str) -> str:
        """`dist==version` of the plugin that registered `name`."""
        self.fill((kind,))
        info = self.owner[(kind, name)]
        return f"{info.dist}=={info.version}"

    def versions(self) -> dict[str, str]:
        return {p.dist: p.version for p in self.plugins if p.error is None}

    def _add(self, kind: str, item: Any, info: PluginInfo) -> None:
        """Add one item; a bad item or a clash is the registering plugin's error (it raises out
        of that plugin's hook, which records it), and the first registration stays."""
        from .contracts import PLUGIN_TYPES

        expected = PLUGIN_TYPES[kind]
        if not isinstance(item, expected):
            raise PluginError(
                f"{info.dist} registered a {type(item).__name__} with register_{kind}; "
                f"expected bench.{expected.__name__}"
            )
        if not NAME_RE.match(item.name):
            raise PluginError(f"{info.dist} registered the invalid {kind[:-1]} name '{item.name}'")
        if item.name in self._items[kind]:
            first = self.owner[(kind, item.name)]
            raise PluginError(
                f"{kind[:-1]} '{item.name}' is registered twice: by {first.dist} and by {info.dist}"
            )
        for alias in getattr(item, "aliases", ()):
            taken = alias in self._items[kind] or alias in self._aliases[kind]
            if taken or not NAME_RE.match(alias.replace("_", "-")):
                raise PluginError(f"{info.dist}: alias '{alias}' of {kind[:-1]} '{item.name}' is "
                                  "invalid or taken")
        if item.name in self._aliases[kind]:
            raise PluginError(f"{kind[:-1]} '{item.name}' is already an alias of "
                              f"'{self._aliases[kind][item.name]}'")
        self._items[kind][item.name] = item
        self._aliases[kind].update(dict.fromkeys(getattr(item, "aliases", ()), item.name))
        self.owner[(kind, item.name)] = info
        info.registered.setdefault(kind, []).append(item.name)


def failure(exc: BaseException) -> str:
    """What a plugin's import or hook raised, in one line: its own sys.exit() and a
    KeyboardInterrupt it raises (not Ctrl-C: that arrives while the user waits, not at import)
    fail the plugin, never the host."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: plugin code called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


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
    registry._filled = set()
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
        registry._plugins.append(info)
        try:
            module = ep.load()
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a broken plugin must not break the others
            info.error = f"import failed: {failure(exc)}"
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
    return registry


@functools.cache
def registry() -> Registry:
    """The installed plugins, loaded once per process (the public `bench.registry()`)."""
    return load_registry()


def deferred(target: str):
    """A subcommand's `func` that imports `module:function` only when the command runs, so
    that a plugin's `register_commands` can define its arguments without importing torch
    (`bench --help` loads every plugin): `p.set_defaults(func=deferred("pkg.cmd:run"))`."""
    module, _, name = target.partition(":")

    def run(registry: Registry, args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(registry, args)

    return run


def register_all(target: str):
    """A `register_*` hook that imports `module:NAME` only when the hook runs and registers
    each item of it (a list, or a function that returns one), so that a plugin's entry module
    registers without importing torch (`bench --help` loads every plugin), as `deferred` does
    for a command: `register_samplers = bench.register_all("pkg.catalog:SAMPLERS")`."""
    import importlib

    from . import hookimpl

    module, _, name = target.partition(":")

    def register_each(register: Any) -> None:
        items = getattr(importlib.import_module(module), name)
        for item in items() if callable(items) else items:
            register(item)

    return hookimpl(register_each)
