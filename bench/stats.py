"""Bootstrap uncertainty and paired verdicts for the quality metrics.

A quality number of a cell (FID, KID, precision, recall, fd, rmse) is a function of its
n samples against a fixed reference. Its uncertainty is the bootstrap over samples:
draw n sample positions with replacement, recompute the metric on those samples (their
features) against the same reference, B times; `Value.std` is the standard deviation
of those B replicates, a standard error of the point value.

Paired: every cell of equal n is resampled with the SAME index sets (`index_sets(n, B,
seed)`), and samples at one position share their initial noise across methods, so the
difference of two methods' replicates, replicate by replicate, is a paired bootstrap
replicate of the difference of their metrics. `paired_interval` is its percentile
interval; `verdict` names the best method, the ones statistically tied with it and the
worse ones.

Metric states provide `replicates(index_sets) -> {key: array [B]}` (see `Bootstrapped`);
row b of `index_sets` holds n positions 0..n-1 (the order in which the samples reached
`update`, which is the cell's sample index order in the runner).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import UsageError

DEFAULT_B = 200


def index_sets(n: int, B: int = DEFAULT_B, seed: int = 0) -> np.ndarray:
    """B rows of n sample positions drawn uniformly with replacement, int64 [B, n].

    A function of (n, B, seed) alone (its own PCG64 stream keyed by seed and n), so every
    cell with n samples gets the same rows; the first rows do not depend on B.
    """
    if n < 1 or B < 1:
        raise ValueError(f"index_sets needs n >= 1 and B >= 1, got n={n}, B={B}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(n)]))
    return rng.integers(0, n, size=(B, n), dtype=np.int64)


def counts(index_sets: np.ndarray, n: int) -> np.ndarray:
    """How often each position 0..n-1 occurs in each row: float64 [B, n] (rows of any length)."""
    index_sets = np.asarray(index_sets)
    if index_sets.ndim != 2:
        raise ValueError(f"index sets of shape {index_sets.shape}; need [B, length]")
    if index_sets.size and (index_sets.min() < 0 or index_sets.max() >= n):
        raise ValueError(f"index sets hold positions outside 0..{n - 1}")
    B = len(index_sets)
    offset = (np.arange(B, dtype=np.int64) * n)[:, None]
    return np.bincount((index_sets + offset).ravel(), minlength=B * n).reshape(B, n).astype(np.float64)


def std_of(replicates: np.ndarray) -> float | None:
    """The bootstrap standard error: the sample std (ddof 1) of the finite replicates."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    return float(r.std(ddof=1)) if len(r) > 1 else None


def _pair(rep_a: np.ndarray, rep_b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(rep_a, dtype=np.float64), np.asarray(rep_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired replicates need equal 1-d shapes (the same index sets), got {a.shape} and {b.shape}"
        )
    return a - b


def paired_interval(rep_a: np.ndarray, rep_b: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a - b from paired replicates (same index sets on both sides).

    The (1 - level) / 2 and (1 + level) / 2 quantiles (linear interpolation) of the B
    replicate differences. With B replicates, levels beyond 1 - 2 / B reach the extreme
    differences: the interval then excludes 0 only when (nearly) every replicate agrees.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = _pair(rep_a, rep_b)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan"), float("nan")
    low, high = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def verdict(
    point: Mapping[str, float],
    reps: Mapping[str, np.ndarray],
    higher_is_better: bool,
    level: float = 0.95,
) -> dict[str, Any]:
    """The best method, the methods tied with it and the worse ones, from paired replicates.

    `best` has the best point estimate. Every other method m gets the percentile interval
    of its paired replicate difference m - best; it is `worse` when that interval lies
    entirely on the worse side of 0, else `tied` (not significantly worse).

    Multiple comparisons: Holm's step-down over the k other methods, family-wise error
    `1 - level`. They are ordered by their bootstrap p-value (twice the smaller share of
    differences on either side of 0); the i-th (from 0) is tested with the interval at
    level 1 - (1 - level) / (k - i), and the first that is not worse stops the procedure:
    it and every later one are tied. Each method's interval is reported at the level it
    was tested at. With B replicates, p-values below about 2 / B are not resolved, so with
    many methods a `worse` needs (nearly) all replicates on the worse side.

    Returns {"best", "tied", "worse", "higher_is_better", "level", "correction",
    "methods": {name: {"point", "diff", "interval", "level", "status"}}}, JSON-ready;
    `diff` and `interval` are of m - best (for higher-is-better metrics, negative is worse).
    Methods whose point value is not finite are left out.
    """
    names = [m for m in point if np.isfinite(point[m])]
    missing = [m for m in names if m not in reps]
    if missing:
        raise ValueError(f"no replicates for {missing}")
    if not names:
        raise ValueError("verdict needs at least one method with a finite point value")
    sign = -1.0 if higher_is_better else 1.0  # sign * (m - best) > 0 means m is worse
    best = min(names, key=lambda m: sign * point[m])
    others = [m for m in names if m != best]

    def p_value(m: str) -> tuple[float, float]:
        d = sign * _pair(reps[m], reps[best])
        d = d[np.isfinite(d)]
        if not len(d):
            return 1.0, 0.0
        p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
        spread = d.std()
        z = d.mean() / spread if spread > 0 else (np.inf if d.mean() > 0 else 0.0)
        return p, -z  # ties in p broken by the standardised difference

    order = sorted(others, key=p_value)
    methods: dict[str, dict[str, Any]] = {
        best: {"point": float(point[best]), "diff": 0.0, "interval": [0.0, 0.0], "level": level},
    }
    methods[best]["status"] = "best"
    stopped = False
    for i, m in enumerate(order):
        tested = 1 - (1 - level) / (len(order) - i)
        low, high = paired_interval(reps[m], reps[best], tested)
        worse_side = (low > 0 or high < 0) and sign * (low + high) > 0
        stopped = stopped or not worse_side
        methods[m] = {
            "point": float(point[m]),
            "diff": float(point[m] - point[best]),
            "interval": [low, high],
            "level": tested,
            "status": "tied" if stopped else "worse",
        }
    return {
        "best": best,
        "tied": [m for m in order if methods[m]["status"] == "tied"],
        "worse": [m for m in order if methods[m]["status"] == "worse"],
        "higher_is_better": bool(higher_is_better),
        "level": level,
        "correction": "holm",
        "methods": {m: methods[m] for m in [best, *order]},
    }


class Bootstrapped:
    """Mixin for metric states: `replicates` cached by index sets, and bootstrap std.

    Subclasses implement `_replicates(index_sets) -> {key: array [B]}` and `_count()`
    (samples seen). `replicates` computes once per distinct index-set array (a digest of
    its bytes), so `result()`'s std and the harness's own call with the same sets cost
    one computation. `bootstrap_b` is B for the std that `result()` reports (0: none).
    """

    bootstrap_b: int = DEFAULT_B
    bootstrap_seed: int = 0

    def _replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _count(self) -> int:
        raise NotImplementedError

    def replicates(self, index_sets: np.ndarray) -> dict[str, np.ndarray]:
        """For each row of sample positions (0..n-1, with replacement), the metric
        recomputed on those samples: {key: float64 array [B]}, keys as in `result()`."""
        index_sets = np.ascontiguousarray(index_sets, dtype=np.int64)
        n = self._count()
        if index_sets.ndim != 2 or index_sets.shape[1] != n:
            raise ValueError(f"index sets of shape {index_sets.shape} for {n} samples; need [B, {n}]")
        key = (index_sets.shape, hashlib.sha1(index_sets.tobytes()).hexdigest())
        cache = self.__dict__.setdefault("_replicate_cache", {})
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            out = self._replicates(index_sets)
            cache[key] = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
        return {k: v.copy() for k, v in cache[key].items()}

    def bootstrap_std(self) -> dict[str, float | None]:
        """{key: bootstrap standard error} over `bootstrap_b` default index sets."""
        n = self._count()
        if n < 2 or self.bootstrap_b < 2:
            return {}
        reps = self.replicates(index_sets(n, self.bootstrap_b, self.bootstrap_seed))
        return {k: std_of(v) for k, v in reps.items()}


MAX_B = 100_000


def bootstrap_b(options: Mapping[str, Any], default: int = DEFAULT_B) -> int:
    """B for the reported std: the run's metric option `bootstrap` if set (0: no standard
    errors, else 2 .. MAX_B), else `default`; anything else is a UsageError."""
    value = options.get("bootstrap", default) if options else default
    try:
        b = int(value)
    except (TypeError, ValueError):
        b = -1
    if str(value).strip() not in (str(b), f"{b}.0") or not (b == 0 or 2 <= b <= MAX_B):
        raise UsageError(f"--metric-option bootstrap={value}: give B, the number of bootstrap replicates, "
                         f"from 2 to {MAX_B} (0: no standard errors)")
    return b
