"""What a race (`bench run --race`) costs against a fixed-n run at its largest n, and whether
it reaches the same verdict: the network calls each spends sampling (a method's samples x
its counted NFE; a race draws each sample once), and per budget the race's best against the
fixed run's best and the methods tied with it.

    OMP_NUM_THREADS=1 python benchmarks/race_cost.py --model digits --nfe 5,10,20 --first 256 --most 2048

Both runs go to --out (fixed/ and race/) and resume there, so a second call only prints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = [sys.executable, "-m", "bench"]


def run(argv: list[str]) -> None:
    subprocess.run([*BENCH, "run", *argv, "--quiet", "--report", "csv,verdict"], check=False)


def calls(run_dir: Path) -> tuple[int, dict[str, int]]:
    """Sampling network calls of a run: each method's largest n x its counted NFE (a race's
    cell grows, so its last round's n is every sample it drew); (total, per budget)."""
    last: dict[tuple, dict] = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("status") != "ok":
            continue
        key = (r["model"], r["method"], r["nfe"])
        if key not in last or r["num_samples"] >= last[key]["num_samples"]:
            last[key] = r
    per: dict[str, int] = {}
    for r in last.values():
        per[str(r["nfe"])] = per.get(str(r["nfe"]), 0) + r["num_samples"] * r["nfe_counted"]
    return sum(per.values()), per


def verdicts(run_dir: Path, metric: str | None) -> dict[str, dict]:
    entries = json.loads((run_dir / "verdict.json").read_text())["verdicts"]
    metric = metric or entries[0]["metric"]
    return {str(e["nfe"]): e for e in entries if e["metric"] == metric}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samplers", default="all")
    parser.add_argument("--nfe", default="5,10,20")
    parser.add_argument("--first", type=int, default=256, help="the race's first round n")
    parser.add_argument("--most", type=int, default=2048, help="the race's largest n, the fixed run's n")
    parser.add_argument("--metric", default=None, help="the verdict's metric (default: the race's)")
    parser.add_argument("--out", type=Path, default=Path("reports/race-cost"))
    args = parser.parse_args()
    common = ["--model", args.model, "--samplers", args.samplers, "--nfe", args.nfe]
    run([*common, "--num-samples", str(args.most), "--out", str(args.out / "fixed")])
    run([*common, "--race", "--num-samples", str(args.first), "--max-samples", str(args.most),
         "--out", str(args.out / "race")])
    fixed_calls, fixed_per = calls(args.out / "fixed")
    race_calls, race_per = calls(args.out / "race")
    fixed, race = verdicts(args.out / "fixed", args.metric), verdicts(args.out / "race", args.metric)
    print(f"{'NFE':>4} {'fixed calls':>12} {'race calls':>12} {'ratio':>6}  fixed best (tied) -> race best, "
          "finalists, same best?")
    for nfe in fixed:
        f, r = fixed[nfe], race.get(nfe)
        same = r is not None and r["best"] in (f["best"], *f["tied"])
        ratio = race_per.get(nfe, 0) / max(1, fixed_per.get(nfe, 0))
        race_text = f"{r['best']}, {1 + len(r['tied'])} at n={args.most}" if r else "-"
        print(f"{nfe:>4} {fixed_per.get(nfe, 0):>12,} {race_per.get(nfe, 0):>12,} {ratio:>6.2f}  "
              f"{f['best']} ({len(f['tied'])} tied) -> {race_text}, {'yes' if same else 'NO'}")
    print(f" all {fixed_calls:>12,} {race_calls:>12,} {race_calls / max(1, fixed_calls):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
