"""Racing (`bench run --race`): the decision rule simulated many times on paired synthetic
samples (its error rate and its early exit), and real races through the runner: the
same best as a fixed-n run, fewer samples, resumed after an interruption, read by compare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.cli import main
from bench.race import Race, round_sizes
from bench.records import read_lines
from bench.rundir import RESULTS
from bench.stats import counts, index_sets, verdict

B = 200


def simulate(means: dict[str, float], sizes: list[int], rng: np.random.Generator, *,
             twins: tuple[str, ...] = (), against_best: bool = False) -> Race:
    """One race over methods whose per-sample errors share each sample's noise (as methods do
    on the same seeds): x[m, i] = mean_m + s_i + e[m, i]; `twins` copy the first method's
    samples exactly (one computation under another name). The metric is the mean error.
    `against_best` decides each round instead with bench.stats.verdict (each method tested
    against the round's best, Holm), the rule the race does not use."""
    n_max = sizes[-1]
    shared = rng.normal(size=n_max)
    x = {m: mu + shared + 0.5 * rng.normal(size=n_max) for m, mu in means.items()}
    for twin in twins:
        x[twin] = x[next(iter(means))].copy()
    race = Race(list(x), sizes)
    while not race.done:
        n = race.n
        rows = counts(index_sets(n, B), n)
        point = {m: float(x[m][:n].mean()) for m in race.alive}
        reps = {m: rows @ x[m][:n] / n for m in race.alive}
        entry = race.decide(point, reps, higher_is_better=False)
        if against_best:
            worse = verdict(point, reps, False, race.round_level)["worse"]
            entry["outcome"] = {m: "left" if m in worse else entry["outcome"][m] for m in entry["outcome"]}
        race.apply(entry)
    return race


def separations(races: int, **kw) -> tuple[int, int]:
    """(races in which equally good methods were separated, races whose clearly worse method
    left in the first round)."""
    rng = np.random.default_rng(0)
    separated = first_round = 0
    for _ in range(races):
        race = simulate({"a": 0.0, "b": 0.0, "c": 0.0, "worse": 1.5}, round_sizes(32, 256), rng,
                        twins=("a-twin",), **kw)
        separated += any(m in race.left for m in ("a", "b", "c", "a-twin"))
        first_round += race.left.get("worse") == 1
    return separated, first_round


def test_equally_good_methods_stay_together_and_a_clearly_worse_one_leaves_first():
    races = 300
    separated, first_round = separations(races)  # 4 planned rounds of n = 32, 64, 128, 256
    naive, _ = separations(races, against_best=True)
    print(f"equally good methods separated in {separated} of {races} races ({naive} when each is tested "
          f"against the round's best); the worse one left in round 1 in {first_round}")
    # The family-wise error over all rounds is at most 5%, within its binomial spread; the
    # rule of testing against the round's best alone does not hold it
    bound = 0.05 * races + 2 * np.sqrt(0.05 * 0.95 * races)
    assert separated <= bound < naive
    assert first_round == races


def test_the_twins_are_never_separated_and_the_race_ends_at_the_largest_n():
    race = simulate({"a": 0.0, "b": 0.3}, round_sizes(64, 512), np.random.default_rng(1), twins=("a2",))
    assert "a2" not in race.left and "a" not in race.left
    assert race.history[-1]["n"] == 512 and race.history[-1]["ends"]
    assert race.history[-1]["outcome"]["a2"] in ("best", "tied")


def test_round_sizes_double_up_to_the_largest():
    assert round_sizes(256, 2048) == [256, 512, 1024, 2048]
    assert round_sizes(100, 300) == [100, 200, 300]
    assert round_sizes(64, 64) == [64]


SMALL = ["--model", "mixture", "--metrics", "fd", "--quiet", "--report", "csv,verdict"]
# euler and ddim (eta=0) on one schedule compute the same thing; heun at 6 NFE is far worse
METHODS = ["--samplers", "euler,ddim,heun,dpm++2m", "--schedule", "karras", "--nfe", "6"]


def bench(capsys, *argv) -> int:
    capsys.readouterr()
    return main([str(a) for a in argv])


def finals(out) -> dict[str, dict]:
    """Each sampler's last record (the most samples it got)."""
    last: dict[str, dict] = {}
    for r in read_lines(out / RESULTS):
        if r["sampler"] not in last or r["num_samples"] >= last[r["sampler"]]["num_samples"]:
            last[r["sampler"]] = r
    return last


def test_a_race_reaches_the_fixed_runs_best_with_fewer_samples_and_resumes(tmp_path, capsys):
    fixed, raced = tmp_path / "fixed", tmp_path / "raced"
    assert bench(capsys, "run", *SMALL, *METHODS, "--num-samples", "256", "--out", fixed) == 0
    assert bench(capsys, "run", *SMALL, *METHODS, "--num-samples", "32", "--max-samples", "256", "--race",
                 "--out", raced) == 0
    got = finals(raced)
    assert got["heun"]["race"]["outcome"] == "left" and got["heun"]["num_samples"] == 32
    assert {got["ddim"]["race"]["outcome"], got["euler"]["race"]["outcome"]} <= {"best", "tied"}
    # The same best method as the fixed run at the race's largest n, at the same value
    verdict = json.loads((fixed / "verdict.json").read_text())["verdicts"][0]
    raced_verdict = json.loads((raced / "verdict.json").read_text())["verdicts"][0]
    assert raced_verdict["best"] in (verdict["best"], *verdict["tied"])
    best = next(r["sampler"] for r in got.values() if r["method"] == raced_verdict["best"])
    at_fixed = next(r for r in read_lines(fixed / RESULTS) if r["sampler"] == best)["metrics"]["fd"]["value"]
    assert got[best]["metrics"]["fd"]["value"] == pytest.approx(at_fixed, rel=1e-9)
    assert raced_verdict["race"]["left"]["heun"] == {"round": 1, "n": 32, "outcome": "left"}
    samples = sum(r["num_samples"] for r in got.values())
    assert samples == 3 * 256 + 32  # heun's cell stopped at 32 samples, the fixed run's at 256
    # Interrupted before its last round was decided: a rerun replays the stored rounds, goes on
    lines = (raced / RESULTS).read_bytes().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line)["num_samples"] < 256]
    (raced / RESULTS).write_bytes(b"".join(keep))
    assert bench(capsys, "run", *SMALL, *METHODS, "--num-samples", "32", "--max-samples", "256", "--race",
                 "--out", raced) == 0
    again = finals(raced)
    assert {m: r["race"]["outcome"] for m, r in again.items()} == {m: r["race"]["outcome"]
                                                                   for m, r in got.items()}
    resumed, first = again[best]["metrics"]["fd"]["value"], got[best]["metrics"]["fd"]["value"]
    assert resumed == pytest.approx(first, rel=1e-9)  # the survivors' samples drawn again: round-off
    # compare reads a raced run: each method's last round, the same on both sides
    capsys.readouterr()
    assert main(["compare", str(raced), str(raced)]) == 0
    assert "worse" not in capsys.readouterr().out.split("\n\n")[-1]


def test_race_options_are_checked(tmp_path, capsys):
    out = tmp_path / "r"
    for extra, says in [(["--race", "--shard", "0/2"], "leave out --shard"),
                        (["--race", "--repeats", "2"], "leave out --repeats"),
                        (["--race", "--num-samples", "64", "--max-samples", "32"], "--max-samples: '32'"),
                        (["--max-samples", "64"], "go with --race")]:
        assert bench(capsys, "run", *SMALL, *METHODS, "--out", out, *extra) == 2
        err = capsys.readouterr().err
        assert says in err, err
