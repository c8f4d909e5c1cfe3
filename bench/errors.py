"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import difflib


class BenchError(Exception):
    """Base of every user-facing error; `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(BenchError):
    """Bad command-line input: unknown names, malformed lists, bad option values."""

    exit_code = 2


class PluginError(BenchError):
    """A plugin broke the contract: a name clash, a misspelled hook, a bad registration."""


class Infeasible(BenchError):
    """A sampler cannot spend exactly the requested NFE budget; the message says why."""


class NotApplicable(Infeasible):
    """A modifier cannot act on this model (skip-tuning on a network without UNet skips);
    the runner records the cell as infeasible with the message."""


class BudgetExceeded(BenchError):
    """A sampler called the network more often than its cell's budget allows."""


class ModelLoadError(BenchError):
    """A model could not be loaded: missing file, untrusted pickle, offline with nothing cached."""


def unknown(kind: str, name: str, known: list[str] | tuple[str, ...],
            aliases: dict[str, str] | None = None) -> UsageError:
    """`unknown sampler 'eulr' (closest: euler); known: ...` as a UsageError; `aliases`
    (alias -> name) are accepted names too."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f" (closest: {close[0]})" if close else ""
    listing = ", ".join(sorted(known)) or "none installed"
    return UsageError(f"unknown {kind} '{name}'{hint}; known: {listing}")
