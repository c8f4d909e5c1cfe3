"""The Python API: `bench.run(...)` and `bench.load(run_dir)`, with the CLI's option names
and defaults (`bench run --num-samples 64` is `bench.run(num_samples=64)`).

Both return a pandas DataFrame with the columns of results.csv, one row per cell; the run
directory is `frame.attrs["run_dir"]`. The command line builds its run the same way
(`config_from`), so the two give the same cells and the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MODEL = "digits"  # the embedded UNet (MODEL_CARD.md)
DEFAULT_REPORTERS = "verdict,console,csv,markdown,html"

# `bench run`'s options and their defaults; argparse reads its defaults from here
DEFAULTS: dict[str, Any] = {
    "samplers": "all",
    "nfe": "5,10,20",
    "model": DEFAULT_MODEL,
    "schedule": "default",
    "modifiers": "none",
    "num_samples": 256,
    "batch_size": 256,
    "seed": 0,
    "seeds": None,
    "device": "cpu",
    "threads": 1,
    "repeats": 1,
    "metrics": None,
    "report": DEFAULT_REPORTERS,
    "out": None,
    "dtype": "fp32",
    "channels_last": False,
    "compile": False,
    "shard": None,
    "trust_pickle": False,
    "fid_weights": None,
    "ref_stats": None,
    "prompts": None,
    "cell_timeout": 1800.0,
    "metric_option": None,
    "save_samples": False,
}


def split_specs(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """`a,b` or ["a", "b"] -> ["a", "b"]."""
    parts = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    return [part.strip() for part in parts if part.strip()]


def methods_from(registry, samplers, schedule, modifiers):
    """The grid's methods: samplers x schedules x modifier chains."""
    from .cell import Method, Spec
    from .errors import UsageError

    names = split_specs(samplers)
    if not names:
        raise UsageError("--samplers is empty; name samplers or use 'all'")
    specs = [Spec(n) for n in registry.names("samplers")] if names == ["all"] else [
        Spec.parse(n) for n in names]
    if not specs:
        raise UsageError("no samplers are installed; install a plugin such as bench-classic")
    schedules = [None if s == "default" else Spec.parse(s) for s in split_specs(schedule)]
    chains = [() if v == "none" else tuple(Spec.parse(m) for m in v.split("+"))
              for v in split_specs(modifiers)]
    pairs = [(s, sch) for s in specs for sch in schedules]
    if names == ["all"] and schedules == [None]:  # and the pairings schedules feature (learned ones)
        installed = set(registry.names("samplers"))
        pairs += [(Spec(sampler), Spec(name)) for name in registry.names("schedules")
                  for sampler in registry.get("schedules", name).featured if sampler in installed]
    return [Method(s, sch, ch) for ch in chains for s, sch in pairs]


def parse_nfe(value: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """`5,10,20` (or [5, 10, 20]) -> [5, 10, 20]; anything else is a UsageError."""
    from .errors import UsageError

    parts = split_specs(value) if isinstance(value, str | list | tuple) else [str(value)]
    values = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise UsageError(f"--nfe: '{part}' is not a positive integer; give a comma list such as 5,10,20")
        values.append(int(part))
    return list(dict.fromkeys(values))


def parse_seeds(block: int, seeds: str | None, num_samples: int) -> tuple[int, int]:
    """(first sample seed, sample count): `--seed K` is block K of disjoint blocks of
    `num_samples` seeds (seeds K*N .. K*N+N-1), `--seeds A-B` an explicit range (EDM's)."""
    from .errors import UsageError

    if num_samples < 1:
        raise UsageError(f"--num-samples: {num_samples}; give a positive count of samples per cell")
    if seeds is None:
        if not 0 <= block < 2**62 // num_samples:
            raise UsageError(f"--seed: {block} is not a seed block 0 .. {2**62 // num_samples - 1}")
        return block * num_samples, num_samples
    first, sep, last = str(seeds).partition("-")
    if not (sep and first.isascii() and first.isdigit() and last.isascii() and last.isdigit()
            and int(first) <= int(last) < 2**62):
        raise UsageError(f"--seeds: '{seeds}' is not a range A-B of seeds, e.g. 0-49999")
    return int(first), int(last) - int(first) + 1


def config_from(registry, command: str = "", **options: Any):
    """A RunConfig from `bench run`'s options (DEFAULTS for those not given)."""
    from .distributed import parse_shard
    from .errors import UsageError
    from .runner import RunConfig

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"bench.run: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    if o["seeds"] is not None and "num_samples" in options and o["num_samples"] != DEFAULTS["num_samples"]:
        raise UsageError("--seeds A-B fixes the sample count; leave out --num-samples")
    first, count = parse_seeds(int(o["seed"]), o["seeds"], int(o["num_samples"]))
    if int(o["repeats"]) < 1:
        raise UsageError(f"--repeats: {o['repeats']}; give a positive number of disjoint seed blocks")
    if int(o["threads"]) < 1:
        raise UsageError(f"--threads: {o['threads']}; give a positive number of CPU threads")
    return RunConfig(
        models=split_specs(o["model"]),
        methods=methods_from(registry, o["samplers"], o["schedule"], o["modifiers"]),
        nfe=parse_nfe(o["nfe"]),
        num_samples=count,
        batch_size=o["batch_size"],
        seed=first,
        threads=int(o["threads"]),
        repeats=int(o["repeats"]),
        device=o["device"],
        metrics=split_specs(o["metrics"]) if o["metrics"] else None,
        out=Path(o["out"]) if o["out"] is not None else None,
        command=command,
        model_options={"trust_pickle": bool(o["trust_pickle"]),
                       **({"prompts": str(o["prompts"])} if o["prompts"] else {})},
        prompts=prompt_set_digest(o["prompts"]),
        metric_options=metric_options(o),
        save_samples=bool(o["save_samples"]),
        dtype=o["dtype"],
        channels_last=bool(o["channels_last"]),
        compile=bool(o["compile"]),
        shard=parse_shard(o["shard"]) if o["shard"] else (0, 1),
        cell_timeout=seconds("--cell-timeout", o["cell_timeout"]),
    )


def prompt_set_digest(path: Any) -> str:
    """The digest of a --prompts file (read and checked now: a bad file exits 2), or ""."""
    from .conditioning import prompts_digest, read_prompts

    return prompts_digest(read_prompts(path)) if path else ""


def metric_options(o: dict[str, Any]) -> dict[str, str]:
    """--fid-weights, --ref-stats and each --metric-option KEY=VALUE (a comma list, a list of
    them or a dict) as one dict of strings; a key given twice with two values is a UsageError."""
    from .errors import UsageError

    out = {k: str(o[k]) for k in ("fid_weights", "ref_stats") if o[k]}
    given = o["metric_option"] or {}
    if isinstance(given, dict):
        pairs = [(str(k), str(v)) for k, v in given.items()]
    else:
        pairs = []
        for item in split_specs(given):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--metric-option: '{item}' is not KEY=VALUE, e.g. clip=DIR")
            pairs.append((key.strip(), value.strip()))
    for key, value in pairs:
        if out.get(key, value) != value:
            raise UsageError(f"--metric-option: {key} is given twice ({out[key]}, {value}); give it once")
        out[key] = value
    return out


def seconds(flag: str, value: Any) -> float:
    """A non-negative finite number of seconds (0: no limit), or a UsageError."""
    import math

    from .errors import UsageError

    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not (math.isfinite(out) and out >= 0):
        raise UsageError(f"{flag}: '{value}' is not a number of seconds >= 0 (0: no limit)")
    return out


def run(**options: Any):
    """Run a grid as `bench run` does (same option names and defaults; lists may replace
    comma strings) and return its results as a DataFrame, `attrs["run_dir"]` its directory.
    Reporters named by `report` render as on the command line (`report=""` for none)."""
    from rich.console import Console

    from .plugins import registry
    from .runner import run as run_grid
    from .store import Run

    reg = registry()
    args = " ".join(f"{k}={v!r}" for k, v in options.items())
    config = config_from(reg, command=f"bench.run({args})", **options)
    reporters = [reg.get("reporters", name) for name in split_specs(options.get("report", DEFAULT_REPORTERS))]
    run_dir, _ = run_grid(reg, config)
    result, console = Run.open(run_dir), Console(highlight=False)
    for reporter in reporters:
        reporter.render(result, console)
    return _frame(result)


def load(run_dir: str | Path):
    """A finished run's results as the DataFrame `bench.run` returns."""
    from .store import Run

    return _frame(Run.open(run_dir))


def _frame(result):
    frame = result.frame()
    frame.attrs["run_dir"] = Path(result.dir)
    return frame

