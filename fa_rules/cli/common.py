"""What the command modules share: the console, the registry (with its load warnings), value parsing."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

from fa_rules.core.errors import UserError

# Output that is not a terminal (a pipe, a file, a test) is read by programs and copied from: lines
# never wrap, and tables take their natural width instead of cutting names to fit 80 columns.
out = Console(soft_wrap=True)
if not out.is_terminal:
    out.width = 10_000


class Interrupted(Exception):
    """Ctrl-C in a command; the message says what was kept and how to continue (exit code 130)."""


def registry():
    from fa_rules.plugins.manager import get_registry

    registry = get_registry()
    for plugin, error in registry.failures:
        print(f"warning: plugin '{plugin}' failed to load: {error}", file=sys.stderr)
    for conflict in registry.conflicts:
        print(f"warning: {conflict}", file=sys.stderr)
    return registry


def parse_value(text: str, default: Any, what: str) -> Any:
    """Parse `text` to the type of `default` (bool, int, float, str)."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise UserError(f"{what} expects a {type(default).__name__}, got '{text}'") from None
    return text


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} expects KEY=VALUE, got '{item}'")
        pairs[key.strip()] = value.strip()
    return pairs
