"""Registers the skip-tuning modifier and `bench skip-tune` with sampler-bench.

Import-light on purpose: `bench --help` loads every plugin module, so the modifier (and
torch with it) is imported only when a hook asks for it.
"""

from __future__ import annotations

from pathlib import Path

from bench import DEFAULT_MODEL, deferred, hookimpl


@hookimpl
def register_modifiers(register):
    from bench import Modifier

    from . import modifier

    register(Modifier(
        "skip-tuning",
        modifier.apply,
        "Skip-Tuning (Ma et al., ICML 2024): encoder skips scaled linearly from rho_bottom (innermost) "
        "to rho_top (outermost), no extra NFE; without factors, those `bench skip-tune` stored for the cell",
        options=modifier.OPTIONS,
        takes_cell=True,
    ))


@hookimpl
def register_commands(subparsers):
    add_command(subparsers)


def add_command(subparsers) -> None:
    p = subparsers.add_parser("skip-tune", help="search skip-tuning factors for a model, sampler and budget")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    p.add_argument(
        "--samplers", default="euler", help="comma list of samplers name[:key=value] (default euler)"
    )
    p.add_argument("--nfe", default="5,10", help="comma list of NFE budgets (default 5,10)")
    p.add_argument(
        "--schedule", default="default", help="schedule name[:key=value]; 'default' is the sampler's"
    )
    p.add_argument(
        "--metric", default=None, help="metric to minimise or maximise (default: the model's first)"
    )
    p.add_argument("--num-samples", type=int, default=500, help="samples per candidate (default 500)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=100_000, help="seed of the search samples (default 100000)")
    p.add_argument(
        "--rho-bottom",
        default="0.7,0.85,1.0,1.15,1.3",
        help="comma list of rho_bottom values of the coarse grid (default 0.7,0.85,1.0,1.15,1.3)",
    )
    p.add_argument(
        "--rho-top",
        default="0.85,1.0,1.15",
        help="comma list of rho_top values of the coarse grid (default 0.85,1.0,1.15)",
    )
    p.add_argument("--refine", type=int, default=3, help="step halvings of the compass search (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="factors file to write (default: the tuned-factors cache, <cache>/<model>.json)",
    )
    p.set_defaults(func=deferred("bench_skip_tuning.search:cmd_skip_tune"))
