"""The `fa-rules` command line: the typer app, its commands (thin modules over the packages below),
and the entry point that turns user mistakes into one line and exit code 2.

Command modules define plain functions and import nothing from here; this module registers them,
so there is no import cycle."""

from __future__ import annotations

import sys

import typer

from fa_rules import __version__
from fa_rules.cli import benchmark, catalog, generative, train
from fa_rules.cli.common import out
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


for command in (train.train, catalog.rules, catalog.datasets, catalog.models, benchmark.benchmark,
                generative.reconstruct, generative.probe, generative.sample, generative.fid):
    app.command()(command)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain print: one line, never re-wrapped
    sys.exit(code)


def main() -> None:
    """Entry point: user mistakes become one line and exit code 2, never a traceback."""
    from fa_rules.core.distributed import DistributedError
    from fa_rules.core.trainer import Diverged

    try:
        app()  # standalone: typer reports its own usage errors (exit 2)
    except UserError as e:
        _fail(str(e), 2)
    except (Diverged, DistributedError) as e:
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _fail("interrupted; checkpoints of finished epochs are intact (continue with --resume DIR)", 130)
