"""Comparing runs and gating CI: `bench compare`, `bench check`, `bench baseline`.

In the manner of asv compare: cells are matched by (model, sampler, schedule, modifiers,
NFE budget) of their cell spec (`bench.CellSpec`, stored in each record as `spec`); a cell
whose spec differs otherwise (sample count, seed block, metric versions or options such as
the FID reference, device, precision) is *not comparable*, never a regression. A new
version of the sampler, schedule or modifier plugin is compared (that is what a
regression check is for) and the note names it. Between comparable cells every metric and the calibrated
wall-clock is judged: a change counts only if it exceeds its tolerance (a factor either
way and an absolute floor) AND, where both runs report a spread (`Value.std`, a standard
error), passes a two-sided z-test at level `alpha`; without a spread the tolerance alone
decides and the note says so. Speed is the sampling wall-clock in units of the model's own
forward pass, timed in the same process during the same cell (`model_s` per counted call),
because absolute times differ between machines and with the load on them; it reads
"NFE x (1 + time outside the network / time inside it)", so what it catches is a sampler
or modifier spending more time outside the network. Runs without in-model time fall back
to the run's `calibration_s` (one forward pass timed when the run starts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cell import CellSpec
from .cell import differences as spec_differences
from .errors import UsageError
from .files import write_json
from .options import parse_pairs
from .records import FORMAT, checked, latest
from .rundir import RESULTS, Run

SPEED = "wall"  # the key under which calibrated wall-clock is compared
ANY = "*"  # the tolerance of metrics not named

# Record fields that must agree for two cells' speeds to be comparable
SPEED_IDENTITY = ("batch_size", "device", "channels_last", "compile", "world_size")

# Verdicts that make `bench check` fail; `strict` adds those that mean "not checked"
FAILING = ("worse", "newly failing")
UNCHECKED = ("not comparable", "missing")


# --- Tolerances -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """A change counts when it exceeds both parts: |head - base| > abs, and the factor
    1 + rel either way (head > (1 + rel) base or head < base / (1 + rel), as asv's
    --factor) for positive values, |head - base| > rel |base| otherwise."""

    rel: float = 0.1
    abs: float = 0.0

    def exceeded(self, base: float, head: float) -> bool:
        if abs(head - base) <= self.abs:
            return False
        if base > 0 and head > 0:
            return max(head / base, base / head) > 1 + self.rel
        return abs(head - base) > self.rel * abs(base)

    def __str__(self) -> str:
        parts = [f"x{1 + self.rel:.3g}"] if self.rel else []
        parts += [f"±{self.abs:g}"] if self.abs else []
        return " and ".join(parts) or "exact"

    def to_json(self) -> dict[str, float]:
        return {"rel": self.rel, "abs": self.abs}


DEFAULT_TOLERANCES = {ANY: Tolerance(rel=0.1), SPEED: Tolerance(rel=1.0, abs=1.0)}


def tolerances_from_json(data: dict[str, Any] | None) -> dict[str, Tolerance]:
    """Defaults overridden by a baseline's `tolerances` ({name: {rel, abs}})."""
    out = dict(DEFAULT_TOLERANCES)
    for name, spec in (data or {}).items():
        out[name] = Tolerance(float(spec.get("rel", 0.0)), float(spec.get("abs", 0.0)))
    return out


def parse_tolerance(text: str) -> tuple[str, Tolerance]:
    """`fd:rel=0.05:abs=0.01` -> ("fd", Tolerance(0.05, 0.01)); `wall:rel=3` for speed."""
    how = f"--tolerance '{text}': write METRIC:rel=R[:abs=A], e.g. fd:rel=0.05 or wall:rel=3"
    name, *pairs = text.split(":")
    values: dict[str, float] = {}
    for key, raw in parse_pairs(pairs, lambda _: how):
        try:
            if key not in ("rel", "abs"):
                raise ValueError(key)
            values[key] = float(raw)
        except ValueError:
            raise UsageError(how) from None
        if not values[key] >= 0:  # NaN and negative tolerances never; inf is "never counts"
            raise UsageError(f"--tolerance '{text}': {key} must be a number >= 0 (inf: never counts)")
    if not name or not values:
        raise UsageError(how)
    return name, Tolerance(values.get("rel", 0.0), values.get("abs", 0.0))


# --- Loading results ------------------------------------------------------------------


def load(path: str | Path) -> Run:
    """A run directory, its results.jsonl, or a baseline JSON file, as a Run."""
    p = Path(path)
    if p.is_dir() or p.name == RESULTS:
        return Run.open(p if p.is_dir() else p.parent)
    if p.suffix == ".json":
        data = read_baseline(p)
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        return Run(p, config, latest(baseline_records(p, data["records"])))
    raise UsageError(f"'{p}' is neither a run directory nor a baseline .json file")


def speed(record: dict[str, Any]) -> float | None:
    """Sampling wall-clock per batch in units of one full-resolution model forward pass,
    timed inside the cell itself (model_s over the counted calls, `nfe_equiv` when extra
    calls at other resolutions ran); else in units of the run's `calibration_s`."""
    wall, model_s = record.get("wall_s"), record.get("model_s")
    calls = record.get("nfe_equiv") or record.get("nfe_counted")
    if wall is None:
        return None
    if model_s and calls:
        return wall * calls / model_s
    if record.get("calibration_s"):
        return wall / (record["calibration_s"] * math.ceil(record["num_samples"] / record["batch_size"]))
    return None


# --- Comparing ------------------------------------------------------------------------


@dataclass
class Change:
    """One metric (or the calibrated wall-clock) of one comparable cell."""

    key: str
    base: float | None
    head: float | None
    verdict: str  # better / worse / same / not comparable
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.base is None or self.head is None or self.base == 0:
            return None
        return self.head / self.base


@dataclass
class CellComparison:
    """A cell of either run: its overall verdict, why, and the change of each metric."""

    model: str
    method: str
    nfe: int
    verdict: str  # better / worse / same / newly failing / fixed / still failing / ...
    reason: str = ""
    changes: list[Change] = field(default_factory=list)

    def label(self) -> str:
        return f"{self.method} @ NFE {self.nfe}"


def cell_key(record: dict[str, Any]) -> tuple[str, str, int]:
    """(model, method label, NFE): how a cell is shown."""
    return (record["model"], record["method"], int(record["nfe"]))


def match_key(record: dict[str, Any]) -> tuple:
    """What cells are matched by across runs: the key fields of the cell spec (the label for a
    record written before cell specs)."""
    spec = record.get("spec")
    if not isinstance(spec, dict):
        return ("legacy", *cell_key(record))
    return tuple(tuple(v) if isinstance(v, list) else v for v in (spec.get(k) for k in CellSpec.KEY))


def compare_runs(
    base: Run,
    head: Run,
    tolerances: dict[str, Tolerance] | None = None,
    alpha: float = 0.05,
) -> list[CellComparison]:
    """Every cell of base and head, in base's order then head's new cells."""
    tolerances = tolerances or dict(DEFAULT_TOLERANCES)
    base_cells = {match_key(r): r for r in base.records}
    head_cells = {match_key(r): r for r in head.records}
    out = []
    for key in [*base_cells, *(k for k in head_cells if k not in base_cells)]:
        b, h = base_cells.get(key), head_cells.get(key)
        if b is None:
            out.append(CellComparison(*cell_key(h), "new", "no baseline for this cell"))
        elif h is None:
            out.append(CellComparison(*cell_key(b), "missing", "the head run has no such cell"))
        else:
            out.append(compare_cell(b, h, tolerances, alpha, (base, head)))
    return out


def compare_cell(
    b: dict[str, Any], h: dict[str, Any], tolerances: dict[str, Tolerance], alpha: float,
    runs: tuple[Run, Run] | None = None,
) -> CellComparison:
    """The verdict on one cell present in both runs; `runs` hold their bootstrap replicates
    (a paired test when both have them for the same seeds)."""
    cell = CellComparison(*cell_key(b), "same")
    # Not comparable: what identifies the measurement changed (the cell spec decides alone)
    if not (isinstance(b.get("spec"), dict) and isinstance(h.get("spec"), dict)):
        cell.verdict = "not comparable"
        cell.reason = "a record without a cell spec (written before cell specs); regenerate the baseline"
        return cell
    changed = spec_differences(b["spec"], h["spec"])
    if changed:
        cell.verdict, cell.reason = "not comparable", "; ".join(changed)
        return cell
    # New plugin versions are compared; the note says which changed
    cell.reason = "; ".join(differences(("versions",), b, h))
    # Status changes: a cell that stopped (or started) producing samples
    if b.get("status") != "ok" or h.get("status") != "ok":
        cell.verdict = status_change(b.get("status"), h.get("status"))
        cell.reason = f"{b.get('status')} -> {h.get('status')}" + (
            f": {h.get('reason')}" if h.get("reason") else ""
        )
        return cell
    # Both ok: every metric, then the calibrated wall-clock
    for name in dict.fromkeys([*b.get("metrics", {}), *h.get("metrics", {})]):
        pair = paired_replicates(name, b, h, runs)
        cell.changes.append(compare_metric(name, b, h, tolerances.get(name, tolerances[ANY]), alpha, pair))
    cell.changes.append(compare_speed(b, h, tolerances[SPEED]))
    verdicts = {c.verdict for c in cell.changes}
    cell.verdict = next((v for v in ("worse", "better") if v in verdicts), "same")
    if cell.reason:  # the plugin versions that changed, shown with the cell's first change
        cell.changes[0].note = f"{cell.changes[0].note} ({cell.reason})"
    return cell


def status_change(base: str | None, head: str | None) -> str:
    """ok -> failed or infeasible is newly failing; anything -> ok is fixed."""
    if head == "ok":
        return "fixed"
    if base == "ok" or (head == "failed" and base != "failed"):
        return "newly failing"
    return "still failing" if head == "failed" else "same"


def paired_replicates(name: str, b: dict[str, Any], h: dict[str, Any], runs) -> tuple | None:
    """Both runs' bootstrap replicates of metric `name`, when both cells stored them and drew
    the same samples' noise (the same seeds: their spec agrees), else None."""
    if runs is None or b.get("spec") != h.get("spec"):
        return None
    out = []
    for record, run in zip((b, h), runs, strict=True):
        reps = run.replicates(record)
        if reps is None or name not in reps:
            return None
        out.append(reps[name])
    return tuple(out) if len(out[0]) == len(out[1]) else None


def compare_metric(name: str, b: dict[str, Any], h: dict[str, Any], tol: Tolerance, alpha: float,
                   pair: tuple | None = None) -> Change:
    """Tolerance first, then the paired bootstrap interval of head - base when both runs stored
    replicates on the same noise (bench.stats.paired_interval at level 1 - alpha), else a
    z-test on the two standard errors when both are reported."""
    vb, vh = b.get("metrics", {}).get(name), h.get("metrics", {}).get(name)
    if vb is None or vh is None:
        side = "base" if vb is None else "head"
        return Change(name, _value(vb), _value(vh), "not comparable", f"not measured in {side}")
    base, head = vb["value"], vh["value"]
    # The tolerance: small changes never count
    if not tol.exceeded(base, head):
        return Change(name, base, head, "same", f"within {tol}")
    # The statistical test, where the metric reports its spread
    se_b, se_h = vb.get("std"), vh.get("std")
    if pair is not None:
        from .stats import paired_interval

        low, high = paired_interval(pair[1], pair[0], 1 - alpha)
        if low <= 0 <= high:
            return Change(name, base, head, "same",
                          f"beyond {tol} but not significant (paired interval [{low:.3g}, {high:.3g}])")
        note = f"beyond {tol}; paired interval of head - base [{low:.3g}, {high:.3g}]"
    elif se_b is None or se_h is None:
        note = f"beyond {tol}; no spread reported: tolerance only"
    else:
        z = z_score(base, head, se_b, se_h)
        p = math.erfc(abs(z) / math.sqrt(2))
        if p >= alpha:
            return Change(
                name, base, head, "same", f"beyond {tol} but not significant (z={z:.2f}, p={p:.2g})"
            )
        note = f"beyond {tol}; z={z:.2f}, p={p:.2g}"
    return Change(name, base, head, _direction(base, head, vb.get("higher_is_better", False)), note)


def compare_speed(b: dict[str, Any], h: dict[str, Any], tol: Tolerance) -> Change:
    """Wall-clock per batch in model forward passes; judged by the tolerance alone."""
    base, head = speed(b), speed(h)
    if base is None or head is None:
        return Change(SPEED, base, head, "not comparable", "no in-model time or calibration recorded")
    changed = differences(SPEED_IDENTITY, b, h)
    if changed:
        return Change(SPEED, base, head, "not comparable", "; ".join(changed))
    raw = f"{b['wall_s']:.3g}s -> {h['wall_s']:.3g}s"
    if not tol.exceeded(base, head):
        return Change(SPEED, base, head, "same", f"within {tol} ({raw})")
    return Change(
        SPEED, base, head, _direction(base, head, False), f"beyond {tol}; no spread: tolerance only ({raw})"
    )


def z_score(base: float, head: float, se_b: float, se_h: float) -> float:
    """(head - base) / sqrt(se_b^2 + se_h^2); conservative for paired runs (same noise)."""
    se = math.hypot(se_b, se_h)
    if se == 0:
        return math.copysign(math.inf, head - base) if head != base else 0.0
    return (head - base) / se


def _direction(base: float, head: float, higher_is_better: bool) -> str:
    return "better" if (head > base) == higher_is_better else "worse"


def _value(v: dict[str, Any] | None) -> float | None:
    return None if v is None else v.get("value")


def differences(keys: tuple[str, ...], b: dict[str, Any], h: dict[str, Any]) -> list[str]:
    """What changed among `keys` between two records, one phrase per field."""
    return [_what_changed(k, b.get(k), h.get(k)) for k in keys if b.get(k) != h.get(k)]


def _what_changed(key: str, base: Any, head: Any) -> str:
    """`num_samples 64 -> 128`; for dicts (plugin versions) only the entries that differ."""
    if isinstance(base, dict) and isinstance(head, dict):
        keys = sorted(k for k in {*base, *head} if base.get(k) != head.get(k))
        return "; ".join(f"{key} {k} {base.get(k)} -> {head.get(k)}" for k in keys)
    return f"{key} {base} -> {head}"


# --- Rendering ------------------------------------------------------------------------

COLUMNS = ("cell", "metric", "base", "head", "ratio", "verdict", "note")


def comparison_rows(cells: list[CellComparison]) -> list[tuple[str, ...]]:
    """One row per metric of a compared cell, one row per cell otherwise."""
    multi_model = len({c.model for c in cells}) > 1
    rows = []
    for c in cells:
        label = f"{c.model}: {c.label()}" if multi_model else c.label()
        if not c.changes:
            rows.append((label, "", "", "", "", c.verdict, c.reason))
        for ch in c.changes:
            ratio = "" if ch.ratio is None else f"{ch.ratio:.3f}"
            rows.append((label, ch.key, _num(ch.base), _num(ch.head), ratio, ch.verdict, ch.note))
    return rows


def format_comparison(cells: list[CellComparison]) -> str:
    """A plain-text table (stable, for logs and golden tests) and a count per verdict."""
    rows = [COLUMNS, *comparison_rows(cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    return "\n".join(line.rstrip() for line in lines) + f"\n\n{len(cells)} cells: {summary}\n"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def failures(cells: list[CellComparison], strict: bool = False) -> list[str]:
    """One readable line per offending metric or cell: sampler, budget and the numbers."""
    bad = FAILING + (UNCHECKED if strict else ())
    lines = []
    for c in cells:
        if c.verdict not in bad:
            continue
        where = f"{c.method} @ NFE {c.nfe} on {c.model}"
        worse = [ch for ch in c.changes if ch.verdict == "worse"]
        if not worse:
            lines.append(f"{where}: {c.verdict}: {c.reason}")
        for ch in worse:
            unit = " model forward passes per batch" if ch.key == SPEED else ""
            lines.append(
                f"{where}: {ch.key} {_num(ch.base)} -> {_num(ch.head)}{unit} ({_percent(ch.ratio)}), "
                f"{ch.note}"
            )
    return lines


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio - 1:+.1%}"


# --- Baselines ------------------------------------------------------------------------


def baseline_path(name: str, directory: str | Path = "baselines") -> Path:
    """`default` -> baselines/default.json; a path ending in .json is used as given."""
    return Path(name) if name.endswith(".json") else Path(directory) / f"{name}.json"


def write_baseline(run: Run, path: Path, run_options: dict[str, Any]) -> Path:
    """A baseline file: the run's options (to rerun it), config, tolerances and records, in
    the current record format (`format`).

    Tolerances already in an existing file are kept, so hand-tuned ones survive updates.
    """
    old = json.loads(path.read_text()) if path.exists() else {}
    # Per-record environment, tracebacks and sample-grid paths stay with the run directory
    records = [
        {**{k: v for k, v in r.items() if k not in ("environment", "traceback", "grid", "format_read")},
         "format": FORMAT} for r in run.records
    ]
    data = {
        "name": path.stem,
        "format": FORMAT,
        "run": run_options,
        "config": run.config,
        "tolerances": old.get("tolerances") or {k: t.to_json() for k, t in DEFAULT_TOLERANCES.items()},
        "records": records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return path


def read_baseline(path: Path) -> dict[str, Any]:
    """The baseline file's JSON, or a UsageError saying how to make one."""
    if not path.exists():
        raise UsageError(f"no baseline '{path}'; create it with `bench baseline update {path.stem}`")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not (isinstance(data["run"], dict) and isinstance(data["records"], list)):
            raise TypeError("run or records of the wrong type")
    except (OSError, ValueError, KeyError, TypeError):  # not UTF-8, not JSON, or not a baseline's fields
        raise UsageError(
            f"'{path}' is not a baseline file; regenerate it with `bench baseline update {path.stem}`"
        ) from None
    written = data.get("format", 1)  # a baseline without a format number holds format-1 records
    if not isinstance(written, int) or isinstance(written, bool) or written > FORMAT:
        raise UsageError(f"'{path}' is in baseline format {written!r}, newer than this sampler-bench reads "
                         f"({FORMAT}); upgrade sampler-bench")
    return data


def baseline_records(path: Path, records: list[Any]) -> list[dict[str, Any]]:
    """A baseline's records that are records, each in the current format (a baseline written
    before format numbers holds format-1 records); each other entry is skipped with a warning."""
    return checked([(f"record {i}", r) for i, r in enumerate(records, 1)], path)


def run_argv(options: dict[str, Any]) -> list[str]:
    """A baseline's stored run options as `bench run` arguments."""
    argv = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv
