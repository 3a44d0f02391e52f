"""Errors that mean "the user asked for something we cannot do" (printed as one line, exit 2)."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line and exits with code 2."""


def unknown_name_error(kind: str, name: str, known: list[str]) -> UserError:
    """`unknown rule 'bakprop' (did you mean: backprop?)`, or the full list when nothing is close."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if close:
        hint = f"did you mean: {', '.join(close)}?"
    else:
        hint = f"known: {', '.join(sorted(known))}"
    return UserError(f"unknown {kind} '{name}' ({hint})")


def close_names(typed: str, known: list[str], cutoff: float = 0.65) -> list[str]:
    """The names of `known` that `typed` is likely a slip for, leading dashes aside: those it begins
    (`--ep`: `--epochs`) when there are a few, else up to three by difflib's similarity ratio, each at
    least `cutoff` (which keeps `--seed` for `--sed` and drops `--fid`) and near the best one."""
    bare = typed.lstrip("-")
    started = [name for name in known if len(bare) >= 2 and name.lstrip("-").startswith(bare)]
    if 0 < len(started) <= 3:
        return started
    ratio = {name: difflib.SequenceMatcher(None, bare, name.lstrip("-")).ratio() for name in known}
    floor = max(cutoff, max(ratio.values(), default=0.0) - 0.1)
    return [name for name in sorted(known, key=ratio.get, reverse=True) if ratio[name] >= floor][:3]


class RuleError(UserError):
    """A rule broke its contract (a plugin's bug, not the engine's): one line naming the rule."""


def error_line(e: BaseException) -> str:
    """`Type: first line of the message` (just the type when there is no message): an exception
    as one line for a warning, a note or a failed row."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
