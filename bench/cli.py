"""The `bench` command line: run, list, plugins, report (plugins may add more)."""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import DEFAULT_MODEL, DEFAULT_REPORTERS, DEFAULTS, comma_list, config_from
from .errors import BenchError, UsageError, printable
from .plugins import KINDS, Registry, load_registry
from .scaffold import add_plugin_command

if TYPE_CHECKING:
    from .rundir import Run

# `bench run` options a baseline does not store (it stores the rest, for `bench check` to rerun)
NOT_STORED = ("command", "func", "out", "quiet", "report")
NOT_REPLAYED = ("trust_pickle",)  # a baseline file must not switch on pickle loading


class _Consoles:
    """stdout and stderr rich consoles, made on first use (rich costs import time)."""

    def __getattr__(self, name: str):
        from rich.console import Console

        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        return getattr(self, name)


_c = _Consoles()


def cmd_run(registry: Registry, args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from .cell import resolve_device
    from .checks import validate
    from .distributed import World
    from .rundir import Run
    from .runner import cell_specs, run

    options = {k: getattr(args, k) for k in DEFAULTS}
    config = config_from(registry, command="bench " + shlex.join(sys.argv[1:]), **options)
    reporters = [registry.get("reporters", name) for name in comma_list("--report", args.report)]
    world = World.from_env()  # under torchrun, rank 0 alone shows progress and reports
    shard, n_shards = config.shard
    validate(registry, config)  # every name exists before the grid is counted
    grid = sum(len(cell_specs(registry, config, m, resolve_device(config.device))) for m in config.models)
    n_cells = len(range(shard, grid, n_shards))  # after duplicates, with repeats
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_c.err,
        transient=True,
        disable=args.quiet or not world.main,
    ) as progress:
        cells = progress.add_task("cells", total=None if config.race else n_cells)
        batches = progress.add_task("batches", total=None)

        def on_cell(cell, record):
            progress.advance(cells)
            if record is not None and record.get("status") == "failed":
                progress.console.print(Text.assemble(("failed", "red"), printable(
                    f" {record['method']} @ NFE {cell.nfe}: {record['reason']}")))

        def on_notice(notices):
            for line in (line for lines in notices.values() for line in lines):
                progress.console.print(Text(printable(line)))  # what each uncached fit stage will cost

        def on_start(cell, fit):
            # The cell now running; a fit stage first says so, with its estimate
            progress.update(batches, completed=0, total=None,
                            description=fit[0].replace(" (not cached)", "") if fit else "batches")

        def on_batch(cell_id, done, total):
            progress.update(batches, completed=done, total=total, description="batches")

        run_dir, new = run(registry, config, on_cell=on_cell, on_batch=on_batch, on_start=on_start,
                           on_notice=None if args.quiet else on_notice)
    if not world.main:
        return 0
    code = render(registry, Run.open(run_dir), reporters)
    unstored = [r for r in new if r.get("stored") is False]
    if unstored:  # cells whose record could not be written (a full disk): a rerun runs them again
        _c.err.print(f"[red]{len(unstored)} cells could not be stored[/red] "
                     f"({escape(printable(unstored[0]['reason']))}); free space and rerun the same "
                     "command to resume")
    return 1 if unstored else code


def cmd_merge(registry: Registry, args: argparse.Namespace) -> int:
    from .distributed import merge_runs

    merged = merge_runs(args.run_dirs, args.out, command="bench " + shlex.join(sys.argv[1:]))
    reporters = [registry.get("reporters", name) for name in comma_list("--report", args.report)]
    return render(registry, merged, reporters)


# What to do about an OSError, by errno; those that are the input's fault exit 2
OS_ADVICE = {
    errno.ENAMETOOLONG: (2, "give a shorter path"),
    errno.EEXIST: (2, "it exists already: give another path or remove it"),
    errno.EISDIR: (2, "a directory stands where a file belongs: remove or rename it"),
    errno.ENOTDIR: (2, "a file stands where a directory belongs: give another path"),
    errno.ENOENT: (2, "check the path"),
    errno.EACCES: (2, "give a path you can write"),
    errno.EPERM: (2, "give a path you can write"),
    errno.EROFS: (2, "the file system is read-only: give a path you can write"),
    errno.ENOSPC: (1, "free space and rerun the same command (finished cells are kept)"),
}


def os_error(exc: OSError) -> tuple[int, str]:
    """(exit code, one line) for an OSError: what failed, on which path, and what to do."""
    code, advice = OS_ADVICE.get(exc.errno, (1, "check the disk and the path, then rerun"))
    name = str(exc.filename or "")
    where = f" ({name[:80]}{'...' if len(name) > 80 else ''})" if name else ""
    return code, f"{exc.strerror or type(exc).__name__}{where}; {advice}"


def printable_lines(text: str) -> str:
    """Each line of a plain-text table made safe for a terminal (bench.errors.printable)."""
    return "".join(printable(line) + "\n" for line in text.splitlines())


def escape(text: str) -> str:
    """Text inside a rich markup string, shown as written."""
    from rich.markup import escape as markup_escape

    return markup_escape(text)


def render(registry: Registry, result: Run, reporters) -> int:
    """Run every reporter; a failing reporter is reported, the others still run."""
    code = 0
    for reporter in reporters:
        try:
            reporter.render(result, _c.out)
        except Exception as exc:  # one broken reporter must not lose the others
            _c.err.print(f"[red]reporter '{reporter.name}' failed:[/red] "
                         f"{escape(printable(f'{type(exc).__name__}: {exc}'))}")
            code = 1
    failed = [r for r in result.records if r.get("status") == "failed"]
    if failed:
        _c.err.print(f"[red]{len(failed)} of {len(result.records)} cells failed[/red]; see above")
        code = 1
    return code


def cmd_report(registry: Registry, args: argparse.Namespace) -> int:
    from .rundir import Run

    reporters = [registry.get("reporters", name) for name in comma_list("--report", args.report)]
    run = Run.open(args.run_dir)
    run.sweep()
    return render(registry, run, reporters)


def cmd_plugins(registry: Registry, args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    out = _c.out
    if args.json:
        out.print_json(json.dumps([p.__dict__ | {"module_obj": None} for p in registry.plugins]))
        return 0
    table = Table(title="plugins", title_justify="left")
    for col in ("distribution", "version", "entry point", "registered"):
        table.add_column(col)
    for p in registry.plugins:
        what = Text("; ".join(f"{k}: {', '.join(v)}" for k, v in p.registered.items()))
        if p.error:
            what = Text(printable(f"error: {p.error}"), style="red")
        table.add_row(Text(printable(p.dist)), Text(printable(p.version)),
                      Text(printable(f"{p.name} = {p.module}")), what)
    out.print(table)
    return 0


def cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    """One compact table per kind (samplers: name, NFE rule, default schedule, plugin; the
    others: name, description, plugin); `bench list KIND NAME` shows one item whole, its
    options with their defaults."""
    from rich.table import Table
    from rich.text import Text

    out = _c.out
    if args.name:
        if not args.kind:
            raise UsageError("bench list NAME needs the kind first, e.g. bench list samplers dpm++2m")
        return show_item(registry, args.kind, args.name)
    for kind in [args.kind] if args.kind else list(KINDS):
        items = registry.table(kind)
        rows = []
        for name, item in items.items():
            plugin = registry.version_of(kind, name).split("==")[0].removeprefix("bench-")
            rule = item.nfe_rule if kind == "samplers" else ""
            what = [rule, item.default_schedule] if kind == "samplers" else [item.description]
            rows.append([printable(v) for v in (name, *what, plugin)])
        # Every column on one line: the free text (the rule, the description) gets what is left
        widths = [max((len(r[i]) for r in rows), default=4) for i in range(len(rows[0]) if rows else 0)]
        if kind == "samplers" and widths and sum(widths) + 2 * len(widths) > out.width:
            widths[2], widths[3] = min(widths[2], 10), min(widths[3], 9)  # the rule first when narrow
        free = max(12, out.width - sum(widths) + widths[1] - 2 * len(widths))
        table = Table(title=kind, title_justify="left", box=None)
        heads = ["name", "NFE rule", "schedule", "plugin"] if kind == "samplers" else ["name", "description",
                                                                                          "plugin"]
        for i, head in enumerate(heads):
            width = free if i == 1 else widths[i] if widths else None
            table.add_column(head, style="bold" if i == 0 else None, no_wrap=True, overflow="ellipsis",
                             max_width=width, min_width=width)
        for row in rows:
            table.add_row(*(Text(v) for v in row))
        out.print(table)
    if args.kind == "samplers":
        out.print(Text("bench list samplers NAME shows a sampler's description and options", style="dim"))
    return 0


def show_item(registry: Registry, kind: str, name: str) -> int:
    """One item of a kind: its description, rule, default schedule, options and plugin."""
    from rich.text import Text

    item = registry.get(kind, name)
    lines = [f"{item.name} ({kind[:-1]}): {item.description}"]
    if kind == "samplers":
        lines += [f"NFE rule: {item.nfe_rule}", f"default schedule: {item.default_schedule}",
                  f"stochastic: {'yes' if item.stochastic else 'no'}"]
    if getattr(item, "aliases", ()):
        lines.append(f"aliases: {', '.join(item.aliases)}")
    options = getattr(item, "options", None) or {}
    lines.append("options:" if options else "options: none")
    lines += [f"  {k} = {v!r}" for k, v in options.items()]
    lines.append(f"plugin: {registry.version_of(kind, item.name)}")
    for line in lines:
        _c.out.print(Text(printable(line)))
    return 0


def cmd_compare(registry: Registry, args: argparse.Namespace) -> int:
    from .compare import compare_runs, format_comparison, load

    base = load(args.base)
    cells = compare_runs(base, load(args.head), tolerances(args, None), args.alpha)
    print(printable_lines(format_comparison(cells)), end="")
    return 0


def tolerances(args: argparse.Namespace, baseline: dict | None):
    """A baseline's tolerances, overridden by --tolerance METRIC:rel=R:abs=A."""
    from .compare import parse_tolerance, tolerances_from_json

    tol = tolerances_from_json((baseline or {}).get("tolerances"))
    return tol | dict(parse_tolerance(t) for t in args.tolerance)


def rerun(registry: Registry, options: dict, out_dir: Path | None, reporters: str) -> Run:
    """`bench run` with stored options into `out_dir` (a fresh temporary one by default)."""
    from .compare import run_argv
    from .rundir import Run

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="bench-"))
    # Stored options never grant trust: only the person's own command line can
    options = {k: v for k, v in options.items() if k not in NOT_REPLAYED}
    argv = ["run", *run_argv(options), "--out", str(out_dir), "--quiet", "--report", reporters]
    _c.err.print(f"running: bench {shlex.join(argv)}")
    args, unknown = build_parser(registry).parse_known_args(argv)
    if unknown:
        raise UsageError(f"the baseline's run options {' '.join(unknown)} are not known to this "
                         "`bench run`; regenerate the baseline with `bench baseline update NAME`")
    args.func(registry, args)  # failed cells are judged by the comparison, not here
    return Run.open(out_dir)


def cmd_check(registry: Registry, args: argparse.Namespace) -> int:
    from .compare import baseline_path, compare_runs, failures, format_comparison, load, read_baseline

    path = baseline_path(args.baseline)
    baseline = read_baseline(path)
    head = load(args.run_dir) if args.run_dir else rerun(registry, baseline["run"], args.out, "csv")
    cells = compare_runs(load(path), head, tolerances(args, baseline), args.alpha)
    print(printable_lines(format_comparison(cells)), end="")
    bad = failures(cells, strict=args.strict)
    if bad:
        print(f"\ncheck FAILED against {path}; worse than the baseline beyond tolerance:", file=sys.stderr)
        print("\n".join(f"  {printable(line)}" for line in bad), file=sys.stderr)
        return 1
    if not any(c.changes for c in cells):
        print(f"\ncheck FAILED: no cell of {path} was comparable; regenerate it with "
              f"`bench baseline update {path.stem}`", file=sys.stderr)
        return 1
    print(f"\ncheck passed against {path}: no cell worse beyond its tolerance")
    unchecked = sum(c.verdict in ("not comparable", "missing", "new") for c in cells)
    if unchecked:
        print(f"note: {unchecked} cells were not compared (not comparable, missing or new); if that is "
              f"intended, regenerate the baseline: bench baseline update {path.stem}")
    return 0


def cmd_baseline(registry: Registry, args: argparse.Namespace) -> int:
    from .compare import baseline_path, write_baseline
    from .files import writable_file

    run_args = build_parser(registry).parse_args(["run", *args.run_args])
    options = {k: v if isinstance(v, bool | int | float | str | None) else str(v)
               for k, v in vars(run_args).items() if k not in NOT_STORED}
    target = writable_file(baseline_path(args.name), "baseline")  # before the run, not after it
    result = rerun(registry, options, run_args.out, DEFAULT_REPORTERS)
    path = write_baseline(result, target, options)
    print(f"baseline written: {path} ({len(result.records)} cells; run in {result.dir})")
    return 0


def build_parser(registry: Registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="Benchmark diffusion samplers: quality, counted NFE, wall-clock."
    )
    parser.add_argument("--version", action="version", version=f"sampler-bench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run samplers x NFE budgets on a model and report")
    p.add_argument("--samplers", default=DEFAULTS["samplers"],
                   help="comma list of name[:key=value...], or 'all'")
    p.add_argument("--nfe", default=DEFAULTS["nfe"], help="comma list of NFE budgets (default 5,10,20)")
    p.add_argument("--model", default=DEFAULTS["model"],
                   help=f"model spec name[:arg] (default {DEFAULT_MODEL})")
    p.add_argument("--schedule", default=DEFAULTS["schedule"],
                   help="comma list of schedules name[:key=value]; 'default' is each sampler's own")
    p.add_argument("--modifiers", default=DEFAULTS["modifiers"],
                   help="comma list of variants, each 'none' or mod[:k=v]+mod...; e.g. none,skip-tuning")
    p.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"],
                   help="samples per cell (default 256: the full default grid in minutes on a 2-core CPU; "
                        "FIDs are comparable only at equal counts)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], metavar="K",
                   help="seed block K: the cells sample seeds K*N .. K*N+N-1 (N = --num-samples), so "
                        "blocks never overlap (default 0)")
    p.add_argument("--seeds", default=DEFAULTS["seeds"], metavar="A-B",
                   help="an explicit range of sample seeds, e.g. 0-49999 (EDM's --seeds); sets the count")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], metavar="R",
                   help="R disjoint seed blocks per cell (blocks K .. K+R-1), reported as mean ± sd and min")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                   help="CPU threads for the network (default 1: a second OpenMP thread thrashes when "
                        "anything else runs)")
    p.add_argument("--device", default=DEFAULTS["device"], help="cpu, cuda or cuda:N")
    p.add_argument("--metrics", default=None, help="comma list (default: the model's own)")
    p.add_argument("--report", default=DEFAULT_REPORTERS, help=f"reporters (default {DEFAULT_REPORTERS})")
    p.add_argument("--out", type=Path, default=None, help="run directory (default reports/<model>-<hash>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dtype", default=DEFAULTS["dtype"], choices=["fp32", "bf16", "fp16"],
                   help="precision the network runs in (autocast); samplers stay in float32")
    p.add_argument("--channels-last", action="store_true", help="run the network on channels_last tensors")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the cells whose grid index is I mod N (one job of N); "
                        "join with bench merge")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading pickled models (edm:...); pickles run code, so only files you trust")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="Inception weights for fid-inception (default: torch-fidelity's cache)")
    p.add_argument("--ref-stats", default=None, metavar="REF",
                   help="fid-inception reference: EDM .npz of mu/sigma, image folder or dataset name")
    p.add_argument("--prompts", default=DEFAULTS["prompts"], metavar="FILE",
                   help="text models: one prompt per line, sample i takes prompt i mod n "
                        "(default: the packaged set, bench/assets/prompts.txt)")
    p.add_argument("--cell-timeout", default=DEFAULTS["cell_timeout"], metavar="SECONDS",
                   help="a cell running longer fails and the run goes on; 0: no limit "
                        f"(default {DEFAULTS['cell_timeout']:g})")
    p.add_argument("--metric-option", action=_Joined, default=DEFAULTS["metric_option"], metavar="KEY=VALUE",
                   help="a metric's option, e.g. clip=DIR or reference_steps=256 (repeatable; "
                        "`bench list metrics` shows each metric's)")
    p.add_argument("--race", action="store_true",
                   help="race the methods of each budget: --num-samples is the first round's n, the "
                        "significantly worse leave after each round, survivors get twice the samples")
    p.add_argument("--max-samples", type=int, default=DEFAULTS["max_samples"], metavar="N",
                   help="with --race: the most samples a method gets (default 8 x --num-samples)")
    p.add_argument("--race-time", default=DEFAULTS["race_time"], metavar="SECONDS",
                   help="with --race: start no new round after this many seconds (default 0: no limit)")
    p.add_argument("--save-samples", action="store_true",
                   help="write each cell's samples as uint8 NHWC images to samples/<cell_id>.npz (arr_0)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="re-render the reports of a run from its results.jsonl")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--report", default=DEFAULT_REPORTERS)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge",
                       help="join the run directories of a sweep's shards (--shard I/N) into one run")
    p.add_argument("run_dirs", nargs="+", type=Path, help="the shards' run directories")
    p.add_argument("--out", type=Path, required=True, help="the merged run directory (new)")
    p.add_argument("--report", default=DEFAULT_REPORTERS)
    p.set_defaults(func=cmd_merge)

    add_plugin_command(sub)

    p = sub.add_parser("plugins", help="every plugin: distribution, version, what it registered")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("list", help="samplers (with NFE rules), schedules, models, metrics, ...")
    p.add_argument("kind", nargs="?", choices=list(KINDS))
    p.add_argument("name", nargs="?", help="one item of the kind, shown whole with its options")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("compare", help="per cell: better / worse / newly failing / fixed / not comparable")
    p.add_argument("base", type=Path, help="run directory or baseline .json")
    p.add_argument("head", type=Path, help="run directory or baseline .json")
    add_judging_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="rerun (or read) a run; exit 1 if a cell is worse than the baseline")
    p.add_argument("run_dir", nargs="?", type=Path, help="a run to judge (default: rerun the baseline's)")
    p.add_argument("--baseline", required=True, help="baselines/NAME.json, or NAME")
    p.add_argument("--out", type=Path, default=None, help="where the rerun goes (default: a temporary dir)")
    p.add_argument("--strict", action="store_true", help="also fail on cells not comparable or missing")
    add_judging_arguments(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("baseline", help="`bench baseline update NAME [run options]`: baselines/NAME.json")
    p.add_argument("action", choices=["update"])
    p.add_argument("name", help="NAME for baselines/NAME.json, or a path ending in .json")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="`bench run` options, e.g. --nfe 5,10")
    p.set_defaults(func=cmd_baseline)

    registry.add_commands(sub)
    return parser


class _Joined(argparse.Action):
    """A repeatable option kept as one comma list, which baselines store and replay as one string."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        before = getattr(namespace, self.dest)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def add_judging_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC:rel=R[:abs=A]",
                   help="a change counts beyond max(A, R*|base|); 'wall' is speed (repeatable)")
    p.add_argument("--alpha", type=float, default=0.05, help="level of the z-test on reported spreads")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # no plugin needs loading for that
        print(f"sampler-bench {__version__}")
        return 0
    clean = False
    try:
        registry = load_registry()
        parser = build_parser(registry)
        args = parser.parse_args(argv)
        code = int(args.func(registry, args) or 0)
        clean = True
        return code
    except BenchError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)  # one line, never wrapped
        return exc.exit_code
    except OSError as exc:  # a path that cannot be used, a full disk, a lost mount
        code, text = os_error(exc)
        print(f"error: {printable(text)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        _c.err.print("interrupted; finished cells are kept, rerun the same command to resume")
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():  # leave the group cleanly
            from .distributed import leave

            leave(clean)
