"""Racing: successive elimination on paired samples (`bench run --race`).

At each budget every method starts on the same first block of seeds (`--num-samples`,
n0). After each round, paired comparisons on the same noise (the methods' bootstrap
replicates on the shared index sets, bench.stats) remove every method significantly worse
than another one still racing; the survivors get the next seeds, the count doubling (n0,
2 n0, 4 n0, ... up to `--max-samples`), until one method is left or the largest n is
reached, whose survivors are the race's verdict (the best value, the rest tied with it).
A method's earlier samples are never drawn again: its cell grows, its metric states keep
what they saw.

Error control: with R planned rounds (R = 1 + log2(n_max / n0), rounded up) each round
tests at family-wise level 1 - (1 - level) / R, Bonferroni over every ordered pair of the k
methods in the round (a z-test of the paired difference against its bootstrap standard
error), so over the whole race the chance that any two equally good methods are separated
is at most 1 - level. Comparing every pair, not each method with the round's best alone,
keeps the winner's curse out: the best of several equal estimates is biased towards
"better", and testing each method against it (bench.stats.verdict at the same levels)
separates equal methods far more often than 5% (tests/test_race.py simulates both rules).
The level of each round is recorded.

This module is the decision alone (`Race`), fed point values and paired replicates; the
runner (bench.runner) samples the rounds and stores each round's records, so a rerun
replays the stored rounds to the same decisions and continues where the race stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .errors import UsageError

LEVEL = 0.95


def round_sizes(first: int, most: int) -> list[int]:
    """The sample count of each round: `first`, doubling, the last one `most`."""
    if first < 2 or most < first:
        raise UsageError(f"--race needs 2 <= --num-samples ({first}) <= --max-samples ({most})")
    sizes = [first]
    while sizes[-1] < most:
        sizes.append(min(2 * sizes[-1], most))
    return sizes


@dataclass
class Race:
    """The state of one budget's race: who is still in, who left in which round."""

    methods: list[str]
    sizes: list[int]
    level: float = LEVEL
    alive: list[str] = field(init=False)
    left: dict[str, int] = field(default_factory=dict)  # method -> the round it left in (1-based)
    round: int = 0  # rounds decided so far
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.alive = list(self.methods)

    @property
    def planned(self) -> int:
        return len(self.sizes)

    @property
    def round_level(self) -> float:
        """The family-wise level each round's Holm procedure tests at."""
        return 1 - (1 - self.level) / self.planned

    @property
    def done(self) -> bool:
        return self.round >= self.planned

    @property
    def n(self) -> int:
        """The sample count of the round to run next (or of the last one, when done)."""
        return self.sizes[min(self.round, self.planned - 1)]

    def reached(self, method: str) -> int:
        """The sample count a method reached: the n of the round it left in, or the last run."""
        last = self.left.get(method, min(len(self.history), self.planned))
        return self.sizes[max(last, 1) - 1]

    def decide(self, point: dict[str, float], reps: dict[str, np.ndarray], higher_is_better: bool,
               final: bool = False) -> dict[str, Any]:
        """The next round's decision among the methods still in, without changing the race
        (`apply` does). Method m leaves when it is significantly worse than some other method j:
        its paired difference d = m - j (on the worse side) exceeds z * se, se the standard
        deviation of the paired bootstrap replicates of m - j, z the normal quantile at
        (1 - round_level) / (k (k - 1)) for the k methods still in (Bonferroni over every
        ordered pair: no pair of equally good methods is separated with probability above the
        round's share of 1 - level). A method with no finite value or replicates (its cell
        failed) leaves too. `outcome` per method: continues, left, or once the race ends (the
        last round, one method left, or `final`: its time is up) best / tied."""
        usable = [m for m in self.alive if math.isfinite(point.get(m, math.nan)) and m in reps]
        sign = -1.0 if higher_is_better else 1.0  # sign * (m - j) > 0: m is worse
        pairs = max(1, len(usable) * (len(usable) - 1))
        z = NormalDist().inv_cdf(1 - (1 - self.round_level) / pairs)
        methods: dict[str, dict[str, Any]] = {}
        for m in usable:
            beaten = None
            for j in usable:
                d = sign * (point[m] - point[j])
                se = float(np.std(sign * (np.asarray(reps[m]) - np.asarray(reps[j])), ddof=1))
                if j != m and d > 0 and (se == 0 or d > z * se) and (beaten is None or d > beaten[1]):
                    beaten = (j, d, se)
            methods[m] = {"point": float(point[m]), **({"beaten_by": beaten[0], "diff": beaten[1] * sign,
                                                         "se": beaten[2]} if beaten else {})}
        leaving = [m for m in self.alive if m not in usable or "beaten_by" in methods[m]]
        staying = [m for m in self.alive if m not in leaving]
        best = min(staying, key=lambda m: sign * point[m]) if staying else None
        ends = final or self.round + 1 >= self.planned or len(staying) <= 1
        outcome = {m: "left" for m in leaving}
        for m in staying:
            outcome[m] = ("best" if m == best else "tied") if ends else "continues"
        for m, entry in methods.items():
            entry["status"] = outcome[m]
        return {"best": best, "tied": [m for m in staying if m != best], "worse": leaving,
                "higher_is_better": higher_is_better, "methods": methods, "round": self.round + 1,
                "n": self.n, "level": self.round_level, "z": z, "outcome": outcome, "ends": ends}

    def apply(self, entry: dict[str, Any]) -> None:
        """Take a decided round (`decide`'s entry, possibly computed by another process)."""
        self.round = entry["round"]
        for m, outcome in entry["outcome"].items():
            if outcome == "left" and m in self.alive:
                self.alive.remove(m)
                self.left[m] = self.round
        if entry["ends"]:
            self.round = max(self.round, self.planned)  # nothing more to run
        self.history.append(entry)
