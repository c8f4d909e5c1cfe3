"""The sampler's prepare stage: load the cached predictor for this cell, or fit and cache it.

The runner calls `prepare(denoiser, sigmas, options)` once per cell with a counting
denoiser outside the budget, and records its calls and seconds as the fit cost
(prepare_nfe, prepare_s). The returned options reach `sample`; the plain ones among them
(`predictor_kind`, `predictor_source`, `predictor_file`) say which predictor a cell used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.errors import UsageError

from . import cache
from .fit import FitOptions, Progress, feature_dim, fit_predictor
from .predictor import PredictorConfig, check_scale
from .solvers import make_base

BASE_OPTIONS = {"ipndm": ("max_order",), "dpm++2m": ("lower_order_final",)}
KINDS = ("auto", "bottleneck", "sigma-only")
# FitOptions field -> sampler option
FIT_OPTIONS = {
    "teacher": "teacher",
    "teacher_steps": "teacher_steps",
    "samples": "fit_samples",
    "batch": "fit_batch",
    "epochs": "fit_epochs",
    "seed": "fit_seed",
    "lr": "fit_lr",
    "loss": "fit_loss",
}


def predictor_kind(denoiser, wanted: str) -> str:
    """bottleneck when asked for or (auto) when the model exposes one, else sigma-only."""
    if wanted not in KINDS:
        raise UsageError(f"AMED option predictor must be one of {', '.join(KINDS)}; got '{wanted}'")
    has = bool(getattr(denoiser, "has_bottleneck", False))
    if wanted == "bottleneck" and not has:
        raise UsageError("this model exposes no UNet bottleneck; use predictor=sigma-only or auto")
    return "bottleneck" if wanted == "bottleneck" or (wanted == "auto" and has) else "sigma-only"


def settings(
    denoiser, sigmas, name: str, base: str, options
) -> tuple[dict, PredictorConfig, FitOptions, str]:
    """The cache key, the predictor's shape (feature size still 0), the fit options, the kind."""
    kind = predictor_kind(denoiser, options["predictor"])
    config = PredictorConfig(
        scale_dir=check_scale("scale_dir", options["scale_dir"]),
        scale_time=check_scale("scale_time", options["scale_time"]),
    )
    fit = FitOptions(**{field: options[option] for field, option in FIT_OPTIONS.items()})
    base_options = {k: options[k] for k in BASE_OPTIONS.get(base, ())}
    shape = {k: v for k, v in config.to_json().items() if k != "feature_dim"}
    key = cache.cache_key(
        denoiser,
        sigmas,
        name,
        afs=bool(options["afs"]),
        base_options=base_options,
        fit_options=fit.to_json(),
        predictor={**shape, "kind": kind},
    )
    return key, config, fit, kind


def prepare(
    name: str,
    base: str,
    denoiser,
    sigmas,
    options,
    *,
    force: bool = False,
    out: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The predictor for this cell: packaged, cached or freshly fitted (then cached).

    `force` refits whatever exists; `out` is where a fit is written (default the cache), and
    a valid predictor found elsewhere is copied there too.
    """
    key, config, fit_options, kind = settings(denoiser, sigmas, name, base, options)
    entry = cache.entry_name(key)
    result = {"predictor_kind": kind, "predictor_file": entry}
    # Look up the packaged predictors, then the user cache; anything unfit is refitted
    notes = []
    lookups = () if force else (("packaged", cache.PACKAGED), ("cache", cache.cache_dir()))
    for source, directory in lookups:
        predictor, status = cache.load(directory / entry, key)
        if predictor is not None:
            if out is not None and Path(out).resolve() != directory.resolve():
                Path(out).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(directory / entry, Path(out) / entry)
            return {**result, "fitted_predictor": predictor, "predictor_source": source}
        if status != "missing":
            notes.append(f"{source} entry {status}")
    # Fit: distillation from the teacher, then store it
    if kind == "bottleneck":
        config = PredictorConfig(
            **{**config.to_json(), "feature_dim": feature_dim(denoiser, float(sigmas[0]), sigmas.device)}
        )
    predictor, stats = fit_predictor(
        denoiser,
        sigmas,
        make_base(base, options),
        afs=bool(options["afs"]),
        config=config,
        options=fit_options,
        progress=progress,
    )
    source = f"refitted ({'; '.join(notes)})" if notes else "fitted"
    try:
        cache.save((out or cache.cache_dir()) / entry, predictor, key, stats)
    except OSError as exc:  # an unwritable cache costs a refit next time, not the cell
        source += f", not cached: {exc}"
    return {**result, "fitted_predictor": predictor, "predictor_source": source, "fit_s": stats["fit_s"]}


def estimate(name: str, base: str, denoiser, sigmas, options, call_s) -> dict[str, float] | None:
    """What `prepare` would cost for this cell when no valid predictor is packaged or cached
    (None when one is): the teacher's calls, then the student's per batch and epoch (about 3
    forward passes each with the backward), `call_s(batch)` seconds a forward pass."""
    key, _, fit, _ = settings(denoiser, sigmas, name, base, options)
    entry = cache.entry_name(key)
    if any(cache.load(d / entry, key)[0] is not None for d in (cache.PACKAGED, cache.cache_dir())):
        return None
    intervals = len(sigmas) - 1
    teacher = intervals * -(-fit.teacher_steps // intervals) * (2 if fit.teacher == "heun" else 1)
    student = 2 * intervals - int(bool(options["afs"]))
    sizes = [min(fit.batch, fit.samples - k) for k in range(0, fit.samples, fit.batch)]
    calls = len(sizes) * (teacher + fit.epochs * student)
    return {"calls": calls, "seconds": sum((teacher + 3 * fit.epochs * student) * call_s(b) for b in sizes)}
