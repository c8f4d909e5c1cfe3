"""Plugin discovery through real distribution metadata (entry points on sys.path)."""

from __future__ import annotations

from bench.plugins import load_registry

GOOD = """
import bench
from bench import Plan, Sampler

def sample(model, x, sigmas, *, noise=None, callback=None, **_):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - model(x, sigmas[i])) / sigmas[i]
    return x

@bench.hookimpl
def register_samplers(register):
    register(Sampler("{name}", sample, lambda nfe, o: Plan(nfe, nfe), "NFE = steps", "test sampler"))
"""


def test_third_party_sampler_is_discovered(plugin_site):
    plugin_site("bench-thirdparty", GOOD.format(name="third-euler"), version="2.5")
    registry = load_registry()
    assert "third-euler" in registry.names("samplers")
    assert registry.version_of("samplers", "third-euler") == "bench-thirdparty==2.5"
    # Built-ins come through the same entry-point group
    assert registry.version_of("models", "mixture").startswith("sampler-bench==")
    info = next(p for p in registry.plugins if p.dist == "bench-thirdparty")
    assert info.registered == {"samplers": ["third-euler"]} and info.error is None


def test_broken_plugins_are_reported_and_the_rest_work(plugin_site):
    hook = "import bench\n@bench.hookimpl\ndef {name}(register):\n    {body}\n"
    plugin_site("bench-broken-import", "import does_not_exist_anywhere\n")
    plugin_site("bench-misspelled", hook.format(name="register_sampler", body="pass"))
    plugin_site("bench-raises", hook.format(name="register_samplers", body="1 / 0"))
    plugin_site("bench-fine", GOOD.format(name="fine-euler"))
    registry = load_registry()
    errors = {p.dist: p.error for p in registry.plugins}
    assert "ModuleNotFoundError" in errors["bench-broken-import"]
    assert "register_sampler" in errors["bench-misspelled"]
    assert "ZeroDivisionError" in errors["bench-raises"]
    assert errors["bench-fine"] is None
    assert "fine-euler" in registry.names("samplers")
    assert "euler" in registry.names("samplers")


def test_name_clash_names_both_distributions_and_keeps_the_first(plugin_site):
    plugin_site("bench-clash-a", GOOD.format(name="twin"))
    plugin_site("bench-clash-b", GOOD.format(name="twin"))
    plugin_site("bench-clash-euler", GOOD.format(name="euler"))  # re-registers a first-party name
    registry = load_registry()
    errors = {p.dist: p.error for p in registry.plugins}
    # The second registration is its plugin's error, naming both; the first one stays
    first, second = sorted(d for d in errors if d.startswith("bench-clash-") and d != "bench-clash-euler")
    assert errors[first] is None and "twin" in errors[second]
    assert first in errors[second] and second in errors[second]
    assert registry.version_of("samplers", "twin").startswith(first)
    assert "bench-classic" in errors["bench-clash-euler"]
    assert registry.version_of("samplers", "euler").startswith("bench-classic==")


def test_name_clash_is_shown_by_bench_plugins(plugin_site, capsys):
    from bench.cli import main

    plugin_site("bench-clash-euler", GOOD.format(name="euler"))
    assert main(["plugins"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bench-clash-euler" in text and "registered twice" in text


def test_wrong_type_is_rejected(plugin_site):
    plugin_site(
        "bench-wrongtype",
        "import bench\n@bench.hookimpl\ndef register_samplers(register):\n    register('euler')\n",
    )
    error = next(p.error for p in load_registry().plugins if p.dist == "bench-wrongtype")
    assert "expected bench.Sampler" in error


def test_bench_plugins_restricts_loading(plugin_site, monkeypatch):
    plugin_site("bench-only-me", GOOD.format(name="only-me"))
    monkeypatch.setenv("BENCH_PLUGINS", "bench-only-me")
    registry = load_registry()
    assert registry.names("samplers") == ["only-me"]
    assert "mixture" in registry.names("models")  # the host's built-ins always load
    dists = {p.dist for p in registry.plugins}
    assert "bench-classic" not in dists


LAZY_CATALOG = """
from bench import Plan, Sampler

def sample(model, x, sigmas, *, noise=None, callback=None, **_):
    return x

def plan(nfe, options):
    return Plan(nfe, nfe)

SAMPLERS = [Sampler(name, sample, plan, "NFE = steps", "test sampler") for name in ("lazy-a", "lazy-b")]

def schedules():
    return []
"""


def test_register_all_imports_the_catalog_only_when_the_hook_runs(plugin_site):
    """An entry module that registers through bench.register_all imports its catalog (and
    whatever that imports) when the registry is filled, not when the plugin loads."""
    import sys

    entry = ('import bench\nregister_samplers = bench.register_all("lazy_catalog:SAMPLERS")\n'
             'register_schedules = bench.register_all("lazy_catalog:schedules")\n')
    root = plugin_site("bench-lazy", entry)
    (root / "lazy_catalog.py").write_text(LAZY_CATALOG)
    try:
        registry = load_registry()
        assert "lazy_catalog" not in sys.modules
        assert {"lazy-a", "lazy-b"} <= set(registry.names("samplers"))
        assert "lazy_catalog" in sys.modules
        info = next(p for p in registry.plugins if p.dist == "bench-lazy")
        assert info.registered == {"samplers": ["lazy-a", "lazy-b"]} and info.error is None
    finally:
        sys.modules.pop("lazy_catalog", None)
