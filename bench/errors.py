"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


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
    """A model could not be loaded: missing file, untrusted pickle, offline with nothing cached,
    weights or a declared shape that do not fit the network. The user fixes the input: exit 2."""

    exit_code = 2


def unknown(
    kind: str, name: str, known: list[str] | tuple[str, ...], aliases: dict[str, str] | None = None
) -> UsageError:
    """`unknown sampler 'eulr' (closest: euler); known: ...` as a UsageError; `aliases`
    (alias -> name) are accepted names too.

    The hint is given only where `name` is a known name or alias misspelt, so that it never
    points to another method: the same once case, separators (- _ . space) and '+' written 'p'
    are set aside (`DPM++2M`, `dpmpp-2m`); or the same words and numbers with at most one slip
    in a word -- a letter dropped, doubled, added or swapped with its neighbour, or in a word of
    five letters or more one mistyped, never the first (`eulr`, `karas`); or the name short of
    a trailing number that one known name alone adds (`ddpm-cifar10`). A name that differs in a
    number, a whole word or a short word's letter (`dpmpp_sde` against dpm++2m-sde, `dpm++2s`
    against dpm++2m, `ddpm` against ddim) gets no hint, nor does one that two items fit."""
    import re

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[0-9]+", text.lower().replace("+", "p"))

    def slip(a: str, b: str) -> int | None:
        # 0 if equal, 1 if one typing slip apart, None if another word
        if a == b:
            return 0
        if a.isdigit() or b.isdigit() or a[0] != b[0]:
            return None
        if len(a) == len(b):
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            i, j = diff[0], diff[-1]
            swapped = len(diff) == 2 and j == i + 1 and (a[i], a[j]) == (b[j], b[i])
            return 1 if swapped or (len(diff) == 1 and len(a) >= 5) else None
        short, long = sorted((a, b), key=len)
        if len(long) != len(short) + 1:
            return None
        return 1 if any(long[:i] + long[i + 1 :] == short for i in range(1, len(long))) else None

    def distance(candidate: str) -> int | None:
        # How far `name` is from `candidate` in slips, None if it is another name
        typed, target = words(name), words(candidate)
        if typed and "".join(typed) == "".join(target):
            return 0
        if len(typed) == len(target):
            slips = [slip(a, b) for a, b in zip(typed, target, strict=True)]
            return None if None in slips else sum(slips)
        tail = target[len(typed) :]
        return 1 if typed and target[: len(typed)] == typed and all(w.isdigit() for w in tail) else None

    # Every accepted spelling with the item it names; the closest, if it names one item only
    spellings = {**dict.fromkeys(known), **{a: n for a, n in (aliases or {}).items() if n in known}}
    scored = [(d, s, item or s) for s, item in spellings.items() if (d := distance(s)) is not None]
    best = [(s, item) for d, s, item in scored if d == min(d for d, _, _ in scored)]
    hint = ""
    if best and len({item for _, item in best}) == 1:
        spelling, item = next(((s, i) for s, i in best if s == i), best[0])
        hint = f" (closest: {item})" if spelling == item else f" (closest: {spelling} = {item})"
    listing = ", ".join(sorted(known)) or "none installed"
    return UsageError(f"unknown {kind} '{name}'{hint}; known: {listing}")


def printable(text: object) -> str:
    """Text from a file or a plugin made safe for a terminal: control characters (an escape
    sequence that would clear the screen, a carriage return, a newline in a name) shown as
    their Python escapes instead of acting."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
