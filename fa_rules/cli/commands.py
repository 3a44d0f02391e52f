"""The typer app of `fa-rules`: its commands (thin modules over the packages below), registered here.

Command modules define plain functions and import nothing from here or from `fa_rules.cli.app` (the
entry point, which imports this module inside its Ctrl-C handling), so there is no import cycle."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer

from fa_rules import __version__
from fa_rules.cli import benchmark, catalog, generative, train
from fa_rules.cli.common import Interrupted, check_path_names, out
from fa_rules.core.errors import UserError
from fa_rules.plugins.datasets import DATA_DIR_ENV

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


def _command(command):
    """What every command gets before and around its work:

    - each path it was given (a Path argument or option, and --data-dir) has names the filesystem
      can hold: a name over its limit is one line here, not a traceback from whichever check first
      looks at the path;
    - typer turns a KeyboardInterrupt raised in a command into a silent exit 130, so `main()` would
      never see it: it becomes an `Interrupted` (a command that knows more, e.g. where its run can
      be continued, raises its own) that `main()` prints."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, Path) or (name == "data_dir" and isinstance(value, str)):
                check_path_names(value)
        if os.environ.get(DATA_DIR_ENV):  # the data directory when no --data-dir is given
            try:
                check_path_names(os.environ[DATA_DIR_ENV])
            except UserError as e:
                raise UserError(f"{DATA_DIR_ENV}: {e}") from None
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None

    return wrapper


for command in (train.train, catalog.rules, catalog.datasets, catalog.models, benchmark.benchmark,
                generative.reconstruct, generative.probe, generative.sample, generative.fid):
    app.command()(_command(command))
