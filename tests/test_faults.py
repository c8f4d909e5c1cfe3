"""Nothing lost, nobody in: plugin faults fail their own cell, storage faults leave no half-written
file and a rerun recovers, bad input is one line and exit 2 before any work, hostile files are
skipped by name."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch_fidelity  # noqa: F401 -- imported before the timed cells: its first import (torchvision, 5 s

# on a busy machine) would count against the first cell's --cell-timeout
from bench.cli import main
from bench.records import read_lines as read_records
from bench.rundir import RESULTS
from bench.timelimit import CellTimeout, enforced, time_limit

LOCK = ".lock"

# Fault-injection plugins: each sampler breaks the contract one way; f-rising's schedule rises
FAULTS = """
import sys
import time

import torch

from bench import Plan, PluginError, Sampler, Schedule, UsageError, hookimpl
from bench.solvers import euler_step

calls = {"n": 0}


def plan(nfe, options):
    return Plan(steps=nfe, nfe=nfe)


def euler(model, x, sigmas, **_):
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        x = euler_step(model, x, s[i], s[i + 1])
    return x


def uneven(model, x, sigmas, **_):
    calls["n"] += 1  # the first batch spends the budget, later ones a call less
    return euler(model, x, sigmas if calls["n"] == 1 else sigmas[1:])


def plugin_error(model, x, sigmas, **_):
    raise PluginError("f-plugin-error broke its contract")


def usage_error(model, x, sigmas, **_):
    raise UsageError("f-usage-error says the input is bad")


def exits(model, x, sigmas, **_):
    sys.exit(3)


def hangs(model, x, sigmas, **_):
    while True:
        time.sleep(0.05)


def rising(n, sigma_min, sigma_max, *, device="cpu", **_):
    return torch.linspace(sigma_min, sigma_max, n + 1)


@hookimpl
def register_samplers(register):
    register(Sampler("f-uneven", uneven, plan, "NFE = steps", "spends less NFE on later batches"))
    register(Sampler("f-plugin-error", plugin_error, plan, "NFE = steps", "raises PluginError"))
    register(Sampler("f-usage-error", usage_error, plan, "NFE = steps", "raises UsageError"))
    register(Sampler("f-exit", exits, plan, "NFE = steps", "calls sys.exit(3)"))
    register(Sampler("f-hang", hangs, plan, "NFE = steps", "never returns"))
    register(Sampler("f-rising", euler, plan, "NFE = steps", "rising sigmas", default_schedule="f-rising"))


@hookimpl
def register_schedules(register):
    register(Schedule("f-rising", rising, "sigmas that increase"))
"""

SMALL = ["--model", "mixture", "--metrics", "fd", "--nfe", "3", "--num-samples", "8", "--quiet",
         "--report", "csv"]


def bench(capsys, *argv) -> tuple[int, str]:
    """`bench ARGV` in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_exit_2(code: int, err: str, says: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err


# --- Faults that fail their own cell, the run going on -----------------------------------


def test_each_plugin_fault_fails_its_own_cell_and_the_run_goes_on(plugin_site, tmp_path, capsys):
    plugin_site("bench-faults", FAULTS)
    out = tmp_path / "run"
    samplers = "f-uneven,f-plugin-error,f-usage-error,f-exit,f-hang,f-rising,euler"
    start = time.perf_counter()
    code, err = bench(capsys, "run", *SMALL, "--batch-size", "4", "--samplers", samplers, "--out", out,
                      "--cell-timeout", "3")
    assert code == 1 and "6 of 7 cells failed" in err, err
    assert time.perf_counter() - start < 30  # the hang ended at its limit
    by = {r["sampler"]: r for r in read_records(out / RESULTS)}
    reasons = {
        "f-uneven": "different NFE on different batches",
        "f-plugin-error": "PluginError: f-plugin-error broke its contract",
        "f-usage-error": "UsageError: f-usage-error says the input is bad",
        "f-exit": "SystemExit: plugin code called sys.exit(3)",
        "f-hang": "CellTimeout: the cell ran past --cell-timeout 3 s",
        "f-rising": "do not decrease",
    }
    for sampler, reason in reasons.items():
        assert by[sampler]["status"] == "failed" and reason in by[sampler]["reason"], by[sampler]
    assert by["euler"]["status"] == "ok"
    assert by["f-hang"]["cell_timeout"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["cell_timeout"] == 3 and config["cell_timeout_enforced"] is True


def test_the_time_limit_holds_in_the_main_thread_and_says_where_it_cannot():
    with pytest.raises(CellTimeout, match="ran past --cell-timeout 0.2 s"), time_limit(0.2):
        while True:
            time.sleep(0.01)
    seen = {}

    def elsewhere():
        seen["enforced"] = enforced()
        with time_limit(0.05):  # not enforced off the main thread: the block runs to its end
            time.sleep(0.2)
        seen["done"] = True

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == {"enforced": False, "done": True} and enforced()


# --- Storage: a full disk, corrupt files, two writers --------------------------------------


@pytest.fixture
def disk_full(monkeypatch):
    """`disk_full(predicate, short=False)`: os.write on a file whose path satisfies `predicate`
    fails with ENOSPC, or with `short` writes half its bytes and says so (a disk filling up)."""
    real = os.write

    def install(predicate, short=False):
        def write(fd, data):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if not predicate(path):
                return real(fd, data)
            if short and len(data) > 1:
                return real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", write)
        return monkeypatch

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    return install


def test_a_short_write_leaves_no_torn_record_and_a_rerun_recovers(disk_full, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *SMALL, "--samplers", "euler,heun", "--nfe", "3,4", "--out", out]
    patch = disk_full(lambda p: p.endswith(RESULTS), short=True)
    code, err = bench(capsys, *argv)
    patch.undo()
    assert code == 1 and "4 cells could not be stored" in err and "No space left on device" in err, err
    assert (out / RESULTS).read_bytes() == b""  # every torn line cut back
    code, err = bench(capsys, *argv)
    assert code == 0, err
    records = read_records(out / RESULTS)
    assert len(records) == 4 and len((out / RESULTS).read_bytes().splitlines()) == 4


def test_a_full_disk_leaves_no_half_written_file(disk_full, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *SMALL, "--samplers", "euler", "--out", out, "--report", "csv,markdown,html"]
    patch = disk_full(lambda p: "/samples/" in p or "report." in p)  # results.jsonl itself has room
    code, err = bench(capsys, *argv)
    patch.undo()
    assert code == 1 and "OSError: [Errno 28] No space left on device" in err, err
    (record,) = read_records(out / RESULTS)
    assert record["status"] == "failed" and "No space left" in record["reason"]
    assert "reporter 'markdown' failed" in err and "reporter 'html' failed" in err
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert not [n for n in left if n.endswith(".tmp") or n.endswith(".png") or n.startswith("report.")], left
    # A rerun with space again recovers: the failed cell runs again, every file is whole
    code, err = bench(capsys, *argv)
    assert code == 0, err
    assert read_records(out / RESULTS)[-1]["status"] == "ok"
    assert (out / "report.html").read_text().endswith("</html>")
    assert all(p.stat().st_size > 0 for p in (out / "samples").iterdir())


BAD_LINES = [
    b'{"foo": 1}',
    b"[1, 2, 3]",
    b'{"cell_id": 7, "status": "ok", "model": "mixture", "method": "euler", "nfe": 3}',
    b'{"cell_id": "x", "status": "ok", "model": "mixture", "method": "euler", "nfe": 3, "metrics": "fd"}',
    b'{"cell_id": "y", "status": "ok", "model": "m", "method": "e", "nfe": 3, "metrics": {"fd": {"n": 1}}}',
    b"\x00\xff\xfe\x89PNG binary",
    b'{"cell_id": "z", "status": "ok", "mod',
]


def test_corrupt_records_are_skipped_by_name_and_reports_and_reruns_go_on(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *SMALL, "--samplers", "euler", "--out", out]
    assert bench(capsys, *argv)[0] == 0
    with open(out / RESULTS, "ab") as f:
        f.write(b"\n".join(BAD_LINES))
    code, err = bench(capsys, "report", out, "--report", "console,csv,markdown,html,verdict")
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert [w.split(" line ")[1].split()[0] for w in warned] == [str(i) for i in range(2, 2 + len(BAD_LINES))]
    assert "Traceback" not in err and "failed" not in err
    # A rerun resumes past them, and a wholly binary results file is no crash either
    assert bench(capsys, *argv)[0] == 0
    (out / RESULTS).write_bytes(os.urandom(4096).replace(b"\n", b"."))
    code, err = bench(capsys, "report", out, "--report", "console,csv,markdown,html")
    assert code == 0 and ("not UTF-8" in err or "not JSON" in err), err


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\x00\xff binary"])
def test_a_corrupt_config_is_one_line_exit_2_saying_what_to_do(tmp_path, capsys, content):
    out = tmp_path / "run"
    argv = ["run", *SMALL, "--samplers", "euler", "--out", out]
    assert bench(capsys, *argv)[0] == 0
    (out / "config.json").write_bytes(content)
    for command in (["report", out], argv):
        code, err = bench(capsys, *command)
        one_line_exit_2(code, err, "is corrupt")
        assert "delete it and rerun the same `bench run`" in err
    (out / "config.json").unlink()  # what the message says: the finished cell is kept
    assert bench(capsys, *argv)[0] == 0 and len(read_records(out / RESULTS)) == 1


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another bench run holds it
        os.write(fd, b"4242\n")
        code, err = bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)
    finally:
        os.close(fd)
    one_line_exit_2(code, err, f"another bench run (pid 4242) is writing {out}; wait for it or use another")
    assert not (out / RESULTS).exists()
    assert bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)[0] == 0  # released: it runs


# --- Bad input: one line, exit 2, before any work ------------------------------------------


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one line says) for input that must be refused before any work."""
    a_file = tmp / "a-file"
    binary, fieldless = tmp / "binary.json", tmp / "fieldless.json"
    run = ["run", *SMALL, "--out", tmp / "out"]
    return [
        ([*run, "--samplers", "euler", "--device", "meta"], "--device: 'meta' is not supported"),
        (["run", *SMALL, "--samplers", "euler", "--out", a_file], "is a file, not a directory"),
        (["compare", binary, binary], "is not a baseline file"),
        (["compare", fieldless, fieldless], "is not a baseline file"),
        (["check", "--baseline", binary], "is not a baseline file"),
        (["plugin", "new", "bench-x", "--dir", a_file], "is a file, not a directory"),
        (["train-digits", "--out", tmp / "w.safetensors", "--limit", "0"], "--limit: 0"),
        (["train-digits", "--out", tmp / "w.safetensors", "--limit", "-5"], "--limit: -5"),
        (["train-digits", "--out", tmp / "w.safetensors", "--lr", "nan"], "--lr: nan"),
        (["train-digits", "--out", a_file / "w.safetensors"], "is a file, not a directory"),
        (["skip-tune", "--refine", "-1"], "--refine: -1"),
        (["skip-tune", "--out", a_file / "f.json"], "is a file, not a directory"),
        (["baseline", "update", str(a_file / "b.json"), "--model", "mixture"], "is a file, not a directory"),
        ([*run, "--samplers", "ddim:eta=nan"], "option 'eta': nan is not a finite number"),
        ([*run, "--samplers", "euler", "--schedule", "karras:rho=0"], "rho=0.0 must be a positive number"),
        ([*run, "--nfe", "4", "--samplers", "euler,heun:afs=banana"], "afs=banana"),
        ([*run, "--samplers", "euler", "--num-samples", str(10**12)], "--num-samples: 1000000000000"),
        ([*run, "--samplers", "euler", "--nfe", str(10**9)], "--nfe: 1000000000 is past 100000"),
        ([*run, "--samplers", "euler", "--num-samples", "4000", "--batch-size", "1", "--nfe", "2000",
          "--cell-timeout", "1"], "past --cell-timeout 1 s"),
        ([*run, "--samplers", "euler", "--cell-timeout", "-1"], "--cell-timeout: '-1'"),
        ([*run, "--samplers", "euler", "--model", f"digits:{tmp / 'missing.safetensors'}"], "not found"),
    ]


def test_bad_input_is_one_line_exit_2_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "binary.json").write_bytes(b"\x00\xff\xfe binary")
    (tmp_path / "fieldless.json").write_text('{"foo": 1}')
    for argv, says in bad_inputs(tmp_path):
        code, err = bench(capsys, *argv)
        one_line_exit_2(code, err, says)
        assert not any((tmp_path / "out" / name).exists() for name in (RESULTS, "config.json")), argv


def test_a_read_only_out_is_refused_before_work(tmp_path, capsys):
    read_only = Path("/sys/sampler-bench-out")  # sysfs refuses new directories, even to root
    try:
        read_only.mkdir()
    except OSError:
        pass
    else:
        read_only.rmdir()
        pytest.skip("no read-only directory to try here")
    code, err = bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", read_only)
    one_line_exit_2(code, err, "is not writable")


# --- The edges: one test per class of the second fault matrix --------------------------------


def test_empty_items_in_comma_lists_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    run = ["run", "--model", "mixture", "--metrics", "fd", "--num-samples", "8", "--quiet", "--out", out]
    cases = [
        (["--nfe", "5,,10", "--samplers", "euler"], "--nfe '5,,10' has an empty item"),
        (["--nfe", "5,", "--samplers", "euler"], "--nfe '5,' has an empty item"),
        (["--nfe", "3", "--samplers", "euler,,heun"], "--samplers 'euler,,heun' has an empty item"),
        (["--nfe", "", "--samplers", "euler"], "--nfe is empty"),
        (["--nfe", "3", "--samplers", "euler", "--schedule", ""], "--schedule is empty"),
        (["--nfe", "3", "--samplers", "euler", "--model", ""], "--model is empty"),
        (["--nfe", "3", "--samplers", "euler", "--modifiers", ""], "--modifiers is empty"),
        (["--nfe", "3", "--samplers", "euler", "--metrics", ""], "--metrics is empty"),
    ]
    for extra, says in cases:
        code, err = bench(capsys, *run, *extra)
        one_line_exit_2(code, err, says)
        assert not out.exists() or not any(out.iterdir()), (extra, list(out.iterdir()))
    # the directory is still free: a good run into it is no "another sweep"
    assert bench(capsys, *run, "--nfe", "3", "--samplers", "euler")[0] == 0


def test_os_errors_are_one_line_saying_what_to_do(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = bench(capsys, "fit", "--samplers", "amed-plugin-euler", "--nfe", "5", "--model", "mixture",
                      "--out", a_file)
    one_line_exit_2(code, err, "is a file, not a directory")
    long = tmp_path / ("x" * 300)
    code, err = bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", long)
    one_line_exit_2(code, err, "File name too long")
    out = tmp_path / "run"
    assert bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)[0] == 0
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    for argv in (["run", *SMALL, "--samplers", "euler", "--out", out], ["report", out]):
        code, err = bench(capsys, *argv)
        one_line_exit_2(code, err, "config.json is corrupt (a directory, not a file); delete it")


OOM_FACTORY = """
import torch
from bench.adapters import Preconditioned


class Net(torch.nn.Module):
    def forward(self, x, c_noise):
        if len(x) > 1:  # a batch this device cannot hold
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return torch.zeros_like(x)


def build():
    return Preconditioned(Net(), "edm", (1, 8, 8))
"""


def test_options_the_run_cannot_honour_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    run = ["run", *SMALL, "--samplers", "euler", "--out", out]
    for extra, says in [(["--metric-option", "bootstrap=-5"], "bootstrap=-5: give B"),
                        (["--metric-option", "bootstrap=1"], "bootstrap=1: give B"),
                        (["--repeats", "100000000"], "--repeats: '100000000' is not an integer from 1 to")]:
        start = time.perf_counter()
        one_line_exit_2(*bench(capsys, *run, *extra), says)
        assert time.perf_counter() - start < 10
    factory = tmp_path / "oom.py"
    factory.write_text(OOM_FACTORY)
    code, err = bench(capsys, "run", "--model", f"factory:{factory}:build", "--metrics", "rmse", "--nfe", "2",
                      "--samplers", "euler", "--num-samples", "8", "--quiet", "--out", out)
    one_line_exit_2(code, err, "cannot allocate its memory")
    assert "lower --batch-size" in err and not (out / "config.json").exists()


def hostile_records(good: dict) -> list[dict]:
    """Records a reader could parse but a report must not render: each changes a good one."""
    fd = good["metrics"]["fd"]
    changes = [
        {"metrics": {"fd": {**fd, "std": -1.0}}},
        {"metrics": {"fd": {**fd, "std": float("-inf")}}},
        {"nfe": 10**30},
        {"metrics": {"fd": {**fd, "value": True}}},
        {"metrics": {"fd": {**fd, "value": 1.7e308}}},
        {"wall_s": float("nan")},
        {"floor": {"fd": {"value": float("inf"), "std": 0.1}}},
    ]
    return [{**good, **change, "cell_id": f"bad{i}"} for i, change in enumerate(changes)]


def test_hostile_result_files_are_skipped_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", *SMALL, "--samplers", "euler,heun", "--nfe", "4", "--out", out]
    assert bench(capsys, *argv)[0] == 0
    good = read_records(out / RESULTS)[0]
    with open(out / RESULTS, "a") as f:
        for record in hostile_records(good):
            f.write(json.dumps(record) + "\n")
    code, err = bench(capsys, "report", out, "--report", "console,csv,markdown,html,verdict")
    assert code == 0 and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 7, err
    verdict = json.loads((out / "verdict.json").read_text())["verdicts"][0]
    assert set(verdict["methods"]) == {"euler", "heun"}
    # Replicates cut short, or pickled: the file is named, every reporter and compare still work
    reps = sorted((out / "replicates").iterdir())
    reps[0].write_bytes(reps[0].read_bytes()[:100])
    import numpy as np

    np.savez(reps[1], fd=np.array([{"x": 1}], dtype=object))
    code, err = bench(capsys, "report", out, "--report", "console,csv,markdown,html,verdict")
    assert code == 0 and "Traceback" not in err, err
    assert f"warning: {reps[0].resolve()} replicates skipped" in err and str(reps[1].resolve()) in err, err
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0
    # A --ref-stats file with pickled content is refused in one line (read before any Inception pass)
    from bench.errors import UsageError
    from bench.metrics.fidelity import _npz_stats

    pickled = tmp_path / "ref.npz"
    np.savez(pickled, mu=np.array([{"x": 1}], dtype=object), sigma=np.zeros(2))
    with pytest.raises(UsageError, match="is not a plain .npz of numbers"):
        _npz_stats(pickled)


def test_names_from_files_are_escaped_in_markdown_and_on_the_console(tmp_path, capsys):
    out = tmp_path / "run"
    assert bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)[0] == 0
    (record,) = read_records(out / RESULTS)
    hostile = "x\x1b[2J|</table>\n## <script>alert(1)</script>"
    record.update(method=hostile, cell_id="hostile")
    record["metrics"]["fd"]["title"] = "FD\n# <img src=x onerror=alert(1)>"
    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(["report", str(out), "--report", "console,markdown,html"]) == 0
    console = capsys.readouterr().out
    assert "\x1b[2J" not in console and "\\x1b[2J" in console
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    assert not any(line.startswith(("## <", "# <", "## &lt;")) for line in md.splitlines()), md
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html


def test_temporary_files_of_killed_writers_are_swept(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    assert bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)[0] == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    litter = [out / f".report.html.{dead}.0a1b2c3d.tmp", out / "samples" / f".x.png.{dead}.0a1b2c3d.tmp",
              out / "replicates" / f".x.npz.{dead}.0a1b2c3d.tmp", out / "samples" / f".x.npz.{dead}.tmp"]
    live = out / f".results.csv.{os.getpid()}.0a1b2c3d.tmp"  # a writer still running keeps its file
    for path in [*litter, live]:
        path.write_bytes(b"half")
    assert bench(capsys, "report", out, "--report", "csv")[0] == 0
    assert not any(p.exists() for p in litter) and live.exists()
    for path in litter:
        path.write_bytes(b"half")
    assert bench(capsys, "run", *SMALL, "--samplers", "euler", "--out", out)[0] == 0
    assert not any(p.exists() for p in litter)


def test_merge_writes_as_run_does(tmp_path, capsys):
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for i, shard in enumerate(shards):
        assert bench(capsys, "run", *SMALL, "--samplers", "euler,heun", "--nfe", "3,4", "--shard", f"{i}/2",
                     "--out", shard)[0] == 0
    merged = tmp_path / "all"
    # An interrupted merge (its config still says merging, two records in) is never read as a run
    assert bench(capsys, "merge", *shards, "--out", merged, "--report", "csv")[0] == 0
    full = read_records(merged / RESULTS)
    assert len(full) == 4 and all((merged / r["replicates"]).is_file() for r in full)
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "merging": True}))
    lines = (merged / RESULTS).read_bytes().splitlines(keepends=True)
    (merged / RESULTS).write_bytes(b"".join(lines[:2]))
    one_line_exit_2(*bench(capsys, "report", merged), "did not finish; rerun the same bench merge")
    assert bench(capsys, "merge", *shards, "--out", merged, "--report", "csv")[0] == 0
    assert [r["cell_id"] for r in read_records(merged / RESULTS)] == [r["cell_id"] for r in full]
    # A merge into a directory a run is writing is refused, and changes nothing there
    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        one_line_exit_2(*bench(capsys, "merge", *shards, "--out", busy), "another bench run (pid 4242)")
    finally:
        os.close(fd)
    assert sorted(p.name for p in busy.iterdir()) == [LOCK]


ENDS = """
import sys
sys.exit(5)
"""
INTERRUPTS = """
raise KeyboardInterrupt
"""
SHORT = """
import torch
from bench import Plan, Sampler, hookimpl


def plan(nfe, options):
    return Plan(steps=nfe, nfe=nfe)


def lazy(model, x, sigmas, **_):
    return x  # spends none of its calls and returns the noise


def interrupts(model, x, sigmas, **_):
    raise KeyboardInterrupt


@hookimpl
def register_samplers(register):
    register(Sampler("f-lazy", lazy, plan, "NFE = steps", "spends no calls"))
    register(Sampler("f-interrupts", interrupts, plan, "NFE = steps", "raises KeyboardInterrupt"))
"""


def test_plugins_never_end_the_host(plugin_site, tmp_path, capsys):
    plugin_site("bench-ends", ENDS)
    plugin_site("bench-interrupts", INTERRUPTS)
    plugin_site("bench-short", SHORT)
    capsys.readouterr()
    assert main(["plugins", "--json"]) == 0
    errors = {p["dist"]: p["error"] for p in json.loads(capsys.readouterr().out)}
    assert errors["bench-ends"] == "import failed: SystemExit: plugin code called sys.exit(5)"
    assert errors["bench-interrupts"] == "import failed: KeyboardInterrupt: "
    assert errors["bench-short"] is None
    out = tmp_path / "run"
    code, err = bench(capsys, "run", *SMALL, "--samplers", "f-lazy,f-interrupts,euler", "--out", out)
    assert code == 1 and "2 of 3 cells failed" in err, err
    by = {r["sampler"]: r for r in read_records(out / RESULTS)}
    assert by["f-lazy"]["status"] == "failed"
    assert "planner promised 3 NFE, sampler spent 0" in by["f-lazy"]["reason"]
    assert by["f-interrupts"]["status"] == "failed" and "KeyboardInterrupt raised by plugin code" in \
        by["f-interrupts"]["reason"]
    assert by["euler"]["status"] == "ok"
    verdict = json.loads((out / "verdict.json").read_text()) if (out / "verdict.json").exists() else None
    assert verdict is None or all("f-lazy" not in v["methods"] for v in verdict["verdicts"])
