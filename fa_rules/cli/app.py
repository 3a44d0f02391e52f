"""The `fa-rules` command line: the typer app, its commands (thin modules over the packages below),
and the entry point that turns user mistakes into one line and exit code 2.

Command modules define plain functions and import nothing from here; this module registers them,
so there is no import cycle."""

from __future__ import annotations

import functools
import sys

import typer

from fa_rules import __version__
from fa_rules.cli import benchmark, catalog, generative, train
from fa_rules.cli.common import Interrupted, out
from fa_rules.core.errors import UserError

app = typer.Typer(
    name="fa-rules",
    help="Train and compare credit-assignment rules (backprop, feedback and feature alignment, ...).",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        out.print(f"fa-rules {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
):
    """fa-rules: composable credit-assignment rules on one torch.func engine."""


def _interruptible(command):
    """Typer turns a KeyboardInterrupt raised in a command into a silent exit 130, so `main()` would
    never see it: make it an `Interrupted` (a command that knows more, e.g. where its run can be
    continued, raises its own) that `main()` prints."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None

    return wrapper


for command in (train.train, catalog.rules, catalog.datasets, catalog.models, benchmark.benchmark,
                generative.reconstruct, generative.probe, generative.sample, generative.fid):
    app.command()(_interruptible(command))


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain print: one line, never re-wrapped
    sys.exit(code)


# click's error classes (typer bundles its own click in newer versions: found through a public one)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_error(error) -> str:
    """click's usage error (unknown option, missing or malformed value) as one line, with where to
    look: typer would draw it in a box over several lines."""
    message = " ".join(error.format_message().split()).rstrip(".")
    command = error.ctx.command_path if error.ctx is not None else "fa-rules"
    return f"{message} (see '{command} --help')"


def main() -> None:
    """Entry point: user mistakes become one line and exit code 2, never a traceback."""
    from fa_rules.core.distributed import DistributedError
    from fa_rules.core.trainer import Diverged

    try:
        # not standalone: click's own errors come here to be printed as one line
        code = app(standalone_mode=False, prog_name="fa-rules")
    except _USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `fa-rules` alone: the help, as click gives it
            print(e.ctx.get_help())
            sys.exit(2)
        _fail(_usage_error(e), 2)
    except _CLICK_ERROR as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    except typer.Abort:  # end of input at a prompt
        _fail("aborted", 1)
    except UserError as e:
        _fail(str(e), 2)
    except (Diverged, DistributedError) as e:
        _fail(str(e), 1)
    except Interrupted as e:
        _fail(str(e), 130)
    except KeyboardInterrupt:  # outside a command (e.g. while importing)
        _fail("interrupted", 130)
    # a command's return value is not an exit code; typer.Exit (--help, --version) gives one
    sys.exit(code if isinstance(code, int) else 0)
