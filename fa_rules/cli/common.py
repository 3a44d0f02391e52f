"""What the command modules share: the console, the registry (with its load warnings), value parsing."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from fa_rules.core.config import MAX_SEED
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


def parse_value(text: str, default: Any) -> Any:
    """`text` parsed to the type of `default` (bool, int, float, str); text that does not parse is
    returned as it is, and `check_config` says what the setting must be (its type and range)."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            return text
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        pass
    return text


def parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()  # ' =1' has no key either
        if not sep or not key:
            raise UserError(f"{flag} expects KEY=VALUE, got '{item}'")
        pairs[key] = value.strip()
    return pairs


def check_seed(seed: int) -> None:
    """--seed of a command that draws (sample, reconstruct, fid): the range `train` accepts, which
    torch's 64-bit generators take (the message is check_config's)."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in 0..{MAX_SEED}, got {seed}")


def _abbreviated(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else text[:keep] + "..."


def _name_limits(path: str) -> tuple[int, int]:
    """(longest file name, longest path) in bytes on the filesystem of the nearest existing folder
    of `path` (255 and 4096 on Linux's usual ones)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_path_names(path: str | Path) -> None:
    """`path` names something the OS can look up: no file or folder name in it over the
    filesystem's limit, and the whole not over the path limit. Else the OS answers ENAMETOOLONG,
    which pathlib's `exists()` and `is_dir()` raise instead of answering, in whichever check first
    looks at the path."""
    text = os.fspath(path)
    name_max, path_max = _name_limits(text)
    for name in Path(text).parts:
        size = len(os.fsencode(name))
        if size > name_max:
            where = "" if name == text else f" in {_abbreviated(text)}"
            raise UserError(f"the name '{_abbreviated(name)}'{where} is {size} bytes long, more than the {name_max} "
                            "a file or folder name may have here; give a shorter name")
    size = len(os.fsencode(text))
    if size >= path_max:
        raise UserError(f"{_abbreviated(text)} is {size} bytes long, more than the {path_max - 1} a path may "
                        "have here; give a shorter path")
