"""Runs over several processes (torchrun, gloo, CPU) and over several jobs (--shard, merge).

The 2-process run is a real `torchrun --nproc_per_node=2 -m bench run` in a subprocess; its
results must equal a 1-process run's: metrics, counted NFE and cell ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import Method, Run, Spec, cli
from bench.distributed import World, merge_runs, parse_shard
from bench.errors import UsageError
from bench.plugins import load_registry
from bench.records import read_lines as read_records
from bench.rundir import RESULTS
from bench.runner import RunConfig, run

# A plugin whose samplers misbehave on rank 1 only: one raises (its cell fails), one kills
# its process (the run fails, the finished cells stay)
RANK_CASES = """
import os
from bench import Plan, Sampler, hookimpl
from bench.solvers import euler_step


def plan(nfe, options):
    return Plan(steps=nfe, nfe=nfe)


def euler(model, x, sigmas, **_):
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x = euler_step(model, x, s[i], s[i + 1])
    return x


def flaky(model, x, sigmas, **kw):
    if os.environ.get("RANK") == "1":
        raise ValueError("this rank's sampler broke")
    return euler(model, x, sigmas)


def crash(model, x, sigmas, **kw):
    if os.environ.get("RANK") == "1":
        os._exit(7)
    return euler(model, x, sigmas)


@hookimpl
def register_samplers(register):
    register(Sampler("t-flaky", flaky, plan, "NFE = steps", "fails on rank 1"))
    register(Sampler("t-crash", crash, plan, "NFE = steps", "kills rank 1"))
"""

# 20 samples in batches of 7: three batches, so the last round has a batch for rank 0 only
SIZE = ["--model", "mixture", "--nfe", "3,5", "--num-samples", "20", "--batch-size", "7", "--metrics", "fd"]
SAMPLERS = ["euler", "ddim:eta=1.0"]  # deterministic, and stochastic with per-step noise


def one_process(tmp_path, samplers=SAMPLERS, **kw) -> dict[str, dict]:
    config = RunConfig(
        models=["mixture"],
        methods=[Method(Spec.parse(s)) for s in samplers],
        nfe=[3, 5],
        num_samples=20,
        batch_size=7,
        metrics=["fd"],
        out=tmp_path,
        **kw,
    )
    return {r["cell_id"]: r for r in run(load_registry(), config)[1]}


def same_results(a: dict, b: dict) -> None:
    assert a["status"] == b["status"] == "ok", (a.get("reason"), b.get("reason"))
    assert a["nfe_counted"] == b["nfe_counted"] == a["nfe"]
    assert a["metrics"] == b["metrics"]  # the same floats: the same batches, the same order


def test_two_processes_equal_one_and_a_failing_rank_fails_the_run(plugin_site, tmp_path):
    plugin_site("bench-rank-cases", RANK_CASES)
    out = tmp_path / "two"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--monitor-interval=5",
            "-m",
            "bench",
            "run",
            "--samplers",
            ",".join([*SAMPLERS, "t-flaky", "t-crash"]),
            *SIZE,
            "--out",
            str(out),
            "--quiet",
            "--report",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # Rank 1 dies in the last method's first cell: the run fails and says so ...
    assert proc.returncode != 0
    assert "lost contact with the other processes" in proc.stderr, proc.stderr[-3000:]
    # ... and keeps every cell finished before, written by rank 0 alone
    records = read_records(out / RESULTS)
    assert [(r["sampler"], r["nfe"]) for r in records] == [
        ("euler", 3),
        ("euler", 5),
        ("ddim:eta=1.0", 3),
        ("ddim:eta=1.0", 5),
        ("t-flaky", 3),
        ("t-flaky", 5),
    ]
    # A sampler failing on one rank fails its cell on every rank, the rank named
    flaky = [r for r in records if r["sampler"] == "t-flaky"]
    assert all(
        r["status"] == "failed" and "on rank 1: this rank's sampler broke" in r["reason"] for r in flaky
    )
    # The rest equals a one-process run, cell for cell
    two = {r["cell_id"]: r for r in records if r["sampler"] in SAMPLERS}
    one = one_process(tmp_path / "one")
    assert set(one) == set(two)
    for cell_id, record in one.items():
        same_results(record, two[cell_id])
        assert (record["world_size"], two[cell_id]["world_size"]) == (1, 2)


@pytest.mark.slow
def test_two_processes_exit_cleanly_every_time(tmp_path):
    """Rank 1 once aborted at exit (SIGABRT, gloo's threads alive): every process now leaves
    the group after a last barrier. Two runs, each exit 0 with nothing aborted
    (benchmarks/fault_matrix.py runs more)."""
    for i in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "--monitor-interval=1", "-m", "bench", "run", "--samplers", "euler,heun", "--nfe", "5",
             "--num-samples", "8", "--model", "mixture", "--metrics", "fd", "--out", str(tmp_path / str(i)),
             "--quiet", "--report", "csv"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
        assert [r["status"] for r in read_records(tmp_path / str(i) / RESULTS)] == ["ok", "ok"]


def test_shards_merge_into_the_whole_run(tmp_path):
    whole = one_process(tmp_path / "whole")
    argv = ["run", "--samplers", ",".join(SAMPLERS), *SIZE, "--quiet", "--report", "csv"]
    for i in range(3):  # 4 cells over 3 jobs: 2, 1 and 1 cells
        assert cli.main([*argv, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}")]) == 0
    sizes = [len(read_records(tmp_path / f"s{i}" / RESULTS)) for i in range(3)]
    assert sizes == [2, 1, 1]
    assert (
        cli.main(
            [
                "merge",
                *(str(tmp_path / f"s{i}") for i in range(3)),
                "--out",
                str(tmp_path / "m"),
                "--report",
                "csv",
            ]
        )
        == 0
    )
    merged = Run.open(tmp_path / "m")
    assert [r["cell_id"] for r in merged.records] == list(whole)  # grid order restored
    for r in merged.records:
        same_results(r, whole[r["cell_id"]])
    assert (tmp_path / "m" / "results.csv").is_file()


def test_merge_refuses_shards_of_different_sweeps(tmp_path):
    one_process(tmp_path / "a", samplers=["euler"])
    config = RunConfig(
        models=["mixture"],
        methods=[Method(Spec("euler"))],
        nfe=[3],
        num_samples=10,
        batch_size=10,
        metrics=["fd"],
        out=tmp_path / "b",
    )
    run(load_registry(), config)
    with pytest.raises(UsageError, match="differ in nfe"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(UsageError, match="exists"):
        merge_runs([tmp_path / "a"], tmp_path / "a")


@pytest.mark.parametrize("text", ["3/3", "1", "a/2", "-1/2", "1/0"])
def test_bad_shard_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(text)
    assert parse_shard("2/5") == (2, 5)


def test_dealing_batches_in_rounds():
    batches = list(range(5))
    dealt = [list(World(rank, 2).deal(batches)) for rank in range(2)]
    assert dealt == [[0, 2, 4], [1, 3, None]]  # rank r takes batch 2k + r of round k
    assert list(World().deal(batches)) == batches
    assert World(1, 2, local_rank=1).device("cuda") == "cuda:1" and World().device("cuda") == "cuda"


def test_speed_options_are_recorded_and_keep_cells_apart(tmp_path):
    plain = one_process(tmp_path / "a", samplers=["euler"])
    fast = one_process(tmp_path / "b", samplers=["euler"], dtype="bf16", channels_last=True)
    for record in plain.values():
        assert (record["dtype"], record["channels_last"], record["compile"]) == ("fp32", False, False)
    for record in fast.values():
        assert (record["dtype"], record["channels_last"], record["compile"]) == ("bf16", True, False)
    assert not set(plain) & set(fast)  # a bf16 rerun into the same directory resumes nothing
    with pytest.raises(UsageError, match="--dtype"):
        one_process(tmp_path / "c", samplers=["euler"], dtype="fp8")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["dtype"] == "bf16" and config["environment"]["world_size"] == 1


@pytest.mark.slow
def test_a_race_under_torchrun_equals_the_one_process_race(tmp_path):
    """Every rank runs the same rounds (rank 0 decides and tells the others): the records,
    rounds and outcomes equal a one-process race's."""
    race = ["--samplers", "euler,heun,dpm++2m", "--model", "mixture", "--nfe", "6", "--metrics", "fd",
            "--num-samples", "16", "--max-samples", "64", "--batch-size", "7", "--race", "--quiet",
            "--report", "csv"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["run", *race, "--out", str(one)]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--monitor-interval=1", "-m", "bench", "run"]
    proc = subprocess.run([*torchrun, *race, "--out", str(two)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = Run.open(one).records, Run.open(two).records
    assert [r["cell_id"] for r in a] == [r["cell_id"] for r in b] and len(a) > 3
    for x, y in zip(a, b, strict=True):
        assert x["race"] == y["race"] and x["metrics"] == y["metrics"], (x["method"], x["race"], y["race"])
    assert {r["race"]["outcome"] for r in a} >= {"left", "best"}
