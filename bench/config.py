"""A run's configuration: `bench run`'s options with their one set of defaults, how each is
read and bounded, and the RunConfig they make.

The command line, `bench.run(...)` and `bench.CellSpec` take their defaults from
`DEFAULTS`; `config_from` turns options (strings as typed, or Python values) into a
RunConfig and refuses bad input in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

DEFAULT_MODEL = "digits"  # the embedded UNet (MODEL_CARD.md)
DEFAULT_REPORTERS = "verdict,console,csv,markdown,html"

# `bench run`'s options and their defaults; argparse, bench.run and RunConfig read them here
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
    "race": False,
    "max_samples": None,
    "race_time": 0.0,
}
SPEED_DEFAULTS = {"dtype": "fp32", "channels_last": False, "compile": False}
DTYPES = ("fp32", "bf16", "fp16")
MAX_NFE = 100_000  # network calls per sample a cell may spend: its plan and sigmas live in memory
MAX_CELLS = 100_000  # cells of one grid (models x methods x budgets x repeats)
MAX_SEED = 2**62  # sample seeds stay below this


# --- Reading options ---------------------------------------------------------------------


def comma_list(flag: str, value: Any) -> list[str]:
    """`a,b` (or ["a", "b"]) -> ["a", "b"]; an empty list or an empty item is a UsageError
    (`--nfe 5,,10`, `--model ''`), never silently dropped."""
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in (value or [])]
    items = [p.strip() for p in parts]
    if not items or not any(items):
        raise UsageError(f"{flag} is empty; give a comma list, e.g. {flag} {_EXAMPLES.get(flag, 'a,b')}")
    if not all(items):
        raise UsageError(f"{flag} '{','.join(items)}' has an empty item; remove the extra comma")
    return items


_EXAMPLES = {"--nfe": "5,10,20", "--samplers": "euler,heun", "--model": "digits", "--schedule": "default",
             "--modifiers": "none", "--metrics": "fid-digits", "--report": "console,csv"}


def split_specs(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """`a,b` or ["a", "b"] -> ["a", "b"] (empty items refused: `comma_list`)."""
    return comma_list("the list", text)


def integer(flag: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer in [low, high], or a UsageError naming the range."""
    text = str(value).strip()
    ok = isinstance(value, int) and not isinstance(value, bool) or (text.lstrip("-").isascii()
                                                                     and text.lstrip("-").isdigit())
    number = int(text) if ok else None
    if number is None or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise UsageError(f"{flag}: '{value}' is not an integer {bound}")
    return number


def parse_nfe(value: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """`5,10,20` (or [5, 10, 20]) -> [5, 10, 20]; anything else is a UsageError."""
    parts = comma_list("--nfe", value) if isinstance(value, str | list | tuple) else [str(value)]
    values = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise UsageError(f"--nfe: '{part}' is not a positive integer; give a comma list such as 5,10,20")
        if int(part) > MAX_NFE:
            raise UsageError(f"--nfe: {part} is past {MAX_NFE} network calls per sample, the most a cell may "
                             "spend (its plan and sigmas are held in memory); give a smaller budget")
        values.append(int(part))
    return list(dict.fromkeys(values))


def parse_seeds(block: int, seeds: str | None, num_samples: int) -> tuple[int, int]:
    """(first sample seed, sample count): `--seed K` is block K of disjoint blocks of
    `num_samples` seeds (seeds K*N .. K*N+N-1), `--seeds A-B` an explicit range (EDM's)."""
    if num_samples < 1:
        raise UsageError(f"--num-samples: {num_samples}; give a positive count of samples per cell")
    if seeds is None:
        if not 0 <= block < MAX_SEED // num_samples:
            raise UsageError(f"--seed: {block} is not a seed block 0 .. {MAX_SEED // num_samples - 1}")
        return block * num_samples, num_samples
    first, sep, last = str(seeds).partition("-")
    if not (sep and first.isascii() and first.isdigit() and last.isascii() and last.isdigit()
            and int(first) <= int(last) < MAX_SEED):
        raise UsageError(f"--seeds: '{seeds}' is not a range A-B of seeds, e.g. 0-49999")
    return int(first), int(last) - int(first) + 1


def seconds(flag: str, value: Any) -> float:
    """A non-negative finite number of seconds (0: no limit), or a UsageError."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not (math.isfinite(out) and out >= 0):
        raise UsageError(f"{flag}: '{value}' is not a number of seconds >= 0 (0: no limit)")
    return out


def metric_options(o: dict[str, Any]) -> dict[str, str]:
    """--fid-weights, --ref-stats and each --metric-option KEY=VALUE (a comma list, a list of
    them or a dict) as one dict of strings; a key given twice with two values is a UsageError."""
    from .options import parse_pairs

    out = {k: str(o[k]) for k in ("fid_weights", "ref_stats") if o[k]}
    given = o["metric_option"] or {}
    if isinstance(given, dict):
        pairs = [(str(k), str(v)) for k, v in given.items()]
    else:
        pairs = parse_pairs(comma_list("--metric-option", given),
                            lambda item: f"--metric-option: '{item}' is not KEY=VALUE, e.g. clip=DIR")
    for key, value in pairs:
        if out.get(key, value) != value:
            raise UsageError(f"--metric-option: {key} is given twice ({out[key]}, {value}); give it once")
        out[key] = value
    return out


def methods_from(registry, samplers, schedule, modifiers):
    """The grid's methods: samplers x schedules x modifier chains (`--samplers all` on the
    default schedule adds the pairings the searched schedules feature)."""
    from .cell import Method
    from .options import Spec

    names = comma_list("--samplers", samplers)
    specs = [Spec(n) for n in registry.names("samplers")] if names == ["all"] else [
        Spec.parse(n) for n in names]
    if not specs:
        raise UsageError("no samplers are installed; install a plugin such as bench-classic")
    schedules = [None if s == "default" else Spec.parse(s) for s in comma_list("--schedule", schedule)]
    chains = [() if v == "none" else tuple(Spec.parse(m) for m in v.split("+"))
              for v in comma_list("--modifiers", modifiers)]
    pairs = [(s, sch) for s in specs for sch in schedules]
    if names == ["all"] and schedules == [None]:  # and the pairings schedules feature (learned ones)
        installed = set(registry.names("samplers"))
        pairs += [(Spec(sampler), Spec(name)) for name in registry.names("schedules")
                  for sampler in registry.get("schedules", name).featured if sampler in installed]
    return [Method(s, sch, ch) for ch in chains for s, sch in pairs]


# --- The configuration -------------------------------------------------------------------


@dataclass
class RunConfig:
    """Everything that defines a run; what identifies a cell is hashed into its id."""

    models: list[str]
    methods: list[Any]  # bench.Method
    nfe: list[int]
    num_samples: int = DEFAULTS["num_samples"]
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = 0  # the first sample seed: the cells sample seeds seed .. seed + num_samples - 1
    threads: int = DEFAULTS["threads"]  # CPU threads of the network (torch.set_num_threads); not identity
    repeats: int = DEFAULTS["repeats"]  # disjoint seed blocks per method x budget, each its own cell
    device: str = DEFAULTS["device"]
    metrics: list[str] | None = None
    out: Path | None = None
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)  # e.g. trust_pickle; not identity
    metric_options: dict[str, Any] = field(default_factory=dict)  # e.g. ref_stats; identity if set
    dtype: str = DEFAULTS["dtype"]  # autocast precision of the network: fp32, bf16 or fp16
    channels_last: bool = False
    compile: bool = False
    shard: tuple[int, int] = (0, 1)  # (i, n): this job runs the cells whose grid index is i mod n
    cell_timeout: float = DEFAULTS["cell_timeout"]  # seconds a cell may run (0: no limit); not identity
    save_samples: bool = False  # each cell's samples as uint8 images in samples/<cell_id>.npz; not identity
    prompts: str = ""  # the digest of the --prompts file (bench.conditioning); identity if set
    race: bool = False  # each budget a race (bench.race): num_samples the first round's n; identity if set
    max_samples: int | None = None  # a race's largest n (default 8 x num_samples)
    race_time: float = 0.0  # seconds after which a race starts no new round (0: none); not identity

    def identity(self) -> dict[str, Any]:
        import torch

        return {
            "models": self.models,
            "methods": sorted(
                [str(m.sampler), str(m.schedule), [str(x) for x in m.modifiers]]
                for m in self.methods
            ),
            "nfe": sorted(self.nfe),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metrics": self.metrics,
            "device": torch.device(self.device).type,
            **({"metric_options": self.metric_options} if self.metric_options else {}),
            **({"repeats": self.repeats} if self.repeats > 1 else {}),
            **({"prompts": self.prompts} if self.prompts else {}),
            **({"race": {"max_samples": self.max_samples}} if self.race else {}),
            # The network's speed options, where they differ from the defaults
            **{k: v for k, v in self.speed_options().items() if v != SPEED_DEFAULTS[k]},
        }

    def speed_options(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "channels_last": self.channels_last, "compile": self.compile}

    def run_dir(self) -> Path:
        from .options import digest

        if self.out is not None:
            return Path(self.out)
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.models[0])[:40]
        shard = f"-shard{self.shard[0]}of{self.shard[1]}" if self.shard[1] > 1 else ""
        return Path("reports") / f"{slug}-{digest(self.identity())[:8]}{shard}"


IDENTITY_KEYS = ("models", "methods", "nfe", "num_samples", "seed", "metrics", "device", "metric_options",
                 "dtype", "channels_last", "compile", "repeats", "prompts", "race")


def config_from(registry, command: str = "", **options: Any) -> RunConfig:
    """A RunConfig from `bench run`'s options (DEFAULTS for those not given), every value read
    and bounded here: a bad one is a UsageError before anything is written."""
    from .distributed import parse_shard

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"bench.run: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    if o["seeds"] is not None and "num_samples" in options and o["num_samples"] != DEFAULTS["num_samples"]:
        raise UsageError("--seeds A-B fixes the sample count; leave out --num-samples")
    num_samples = integer("--num-samples", o["num_samples"], 1)
    first, count = parse_seeds(integer("--seed", o["seed"], 0), o["seeds"], num_samples)
    repeats = integer("--repeats", o["repeats"], 1, MAX_CELLS)
    if first + repeats * count > MAX_SEED:
        raise UsageError(f"--repeats: {repeats} blocks of {count} seeds from seed {first} pass seed "
                         f"{MAX_SEED}; give fewer repeats or a lower --seed")
    if o["dtype"] not in DTYPES:
        raise UsageError(f"--dtype: '{o['dtype']}' is not one of {', '.join(DTYPES)}")
    config = RunConfig(
        models=comma_list("--model", o["model"]),
        methods=methods_from(registry, o["samplers"], o["schedule"], o["modifiers"]),
        nfe=parse_nfe(o["nfe"]),
        num_samples=count,
        batch_size=integer("--batch-size", o["batch_size"], 1),
        seed=first,
        threads=integer("--threads", o["threads"], 1, 4096),
        repeats=repeats,
        device=o["device"],
        metrics=comma_list("--metrics", o["metrics"]) if o["metrics"] is not None else None,
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
        race=bool(o["race"]),
        race_time=seconds("--race-time", o["race_time"]),
    )
    if config.race:
        config.max_samples = race_limit(config, o["max_samples"])
    elif o["max_samples"] is not None or config.race_time:
        raise UsageError("--max-samples and --race-time go with --race; add --race or leave them out")
    cells = len(config.models) * len(config.methods) * len(config.nfe) * repeats
    if cells > MAX_CELLS:
        raise UsageError(f"the grid has {cells} cells (models x methods x budgets x repeats), past "
                         f"{MAX_CELLS}; split it into several runs")
    return config


def race_limit(config: RunConfig, most: Any) -> int:
    """A race's largest n (default 8 x the first round's), checked with what a race excludes."""
    if config.shard[1] > 1:
        raise UsageError("--race needs every method of a budget in one job; leave out --shard (torchrun "
                         "spreads a race over processes)")
    if config.repeats > 1:
        raise UsageError("--race grows one seed block per cell; leave out --repeats")
    if config.save_samples:
        raise UsageError("--save-samples is not supported with --race; rerun the winners without --race")
    first = config.num_samples
    limit = 8 * first if most is None else integer("--max-samples", most, first)
    if first < 2:
        raise UsageError(f"--race needs --num-samples of at least 2 (the first round's n), got {first}")
    if limit + config.seed > MAX_SEED:
        raise UsageError(f"--max-samples {limit} from seed {config.seed} passes seed {MAX_SEED}")
    return limit


def prompt_set_digest(path: Any) -> str:
    """The digest of a --prompts file (read and checked now: a bad file exits 2), or ""."""
    from .conditioning import prompts_digest, read_prompts

    return prompts_digest(read_prompts(path)) if path else ""
