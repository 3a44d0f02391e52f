"""The `fa-rules` entry point: `main` runs the typer app (`fa_rules.cli.commands`) and turns user
mistakes into one line and exit code 2, never a traceback.

This module imports only the standard library, and `main` imports the commands inside its Ctrl-C
handling: they import torch, which takes seconds, and Ctrl-C during start-up must be one line and
exit code 130 like Ctrl-C later. `from fa_rules.cli.app import app` still gives the typer app."""

from __future__ import annotations

import os
import sys

# Exit code when the reader of standard output has gone (`fa-rules ... | head -1`): 1, the code
# click gives a command that meets a closed pipe itself and Python's documented recipe. The
# alternative, SIGPIPE's default action restored at start, would also kill the process on a write
# to a closed socket (torch.distributed's peers), silently instead of with its one-line error.
CLOSED_OUTPUT_EXIT = 1


def __getattr__(name: str):
    if name == "app":  # the typer app, for tests and scripts: imported on first use
        from fa_rules.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OutputError(Exception):
    """Standard output refused a write (a full disk, a reader that has gone): not an OSError, so
    that no command's handling of its own files' errors takes it for one of those."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.closed = isinstance(error, BrokenPipeError)


class _Output:
    """sys.stdout while a command runs: writes as before, with characters the output's encoding
    lacks (e.g. 'ø' under PYTHONIOENCODING=ascii) escaped rather than an error, and a write the OS
    refuses raised as `OutputError`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            raise OutputError(e) from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            raise OutputError(e) from None

    def __getattr__(self, name):  # the rest (fileno, isatty, encoding, ...) is the stream's
        return getattr(self._stream, name)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain print: one line, never re-wrapped
    sys.exit(code)


def _drop_pending_output() -> None:
    """What is still buffered for a standard output that refused it goes nowhere: Python would try
    again at exit and print 'Exception ignored ... BrokenPipeError'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stream with no file descriptor (a test's capture)
        pass


def main() -> None:
    """Entry point: user mistakes become one line and exit code 2, never a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    stdout = sys.stdout
    if stdout is not None:  # None: started without one (fd 1 closed), and print() writes nothing
        sys.stdout = _Output(stdout)
    try:
        try:
            code = _run()
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # here, where a full or closed output is handled, not at exit
    except OutputError as e:
        _drop_pending_output()
        if e.closed:  # the reader has gone (`| head -1`): nothing to say, no one to say it to
            sys.exit(CLOSED_OUTPUT_EXIT)
        _fail(f"cannot write to standard output ({e}); send it to a file or a pipe that takes it", 1)
    except KeyboardInterrupt:  # outside a command: while importing, or before one starts
        _fail("interrupted", 130)
    finally:
        sys.stdout = stdout
    sys.exit(code)


def _import_commands():
    """The typer app, imported with Ctrl-C held back until the imports end: a KeyboardInterrupt
    raised inside a library's import (numpy, torch) can leave a half-initialised module that fails
    later with an unrelated error; after the imports it is one line and exit code 130, every time."""
    import signal

    pressed = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        previous = None
    try:
        from fa_rules.cli.commands import app  # imports torch: seconds
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return app


def _run() -> int:
    """Run the command line; return its exit code (a mistake exits here, with its one line)."""
    app = _import_commands()

    import typer

    from fa_rules.cli.common import Interrupted
    from fa_rules.core.distributed import DistributedError
    from fa_rules.core.errors import UserError
    from fa_rules.core.trainer import Diverged

    # click's error classes (typer bundles its own click in newer versions: found through a public one)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        # not standalone: click's own errors come here to be printed as one line
        code = app(standalone_mode=False, prog_name="fa-rules")
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `fa-rules` alone: the help, as click gives it
            print(e.ctx.get_help())
            return 2
        _fail(_usage_error(e), 2)
    except click_error as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    except typer.Abort:  # end of input at a prompt
        _fail("aborted", 1)
    except UserError as e:
        _fail(str(e), 2)
    except (Diverged, DistributedError) as e:
        _fail(str(e), 1)
    except Interrupted as e:
        _fail(str(e), 130)
    # a command's return value is not an exit code; typer.Exit (--help, --version) gives one
    return code if isinstance(code, int) else 0


def _usage_error(error) -> str:
    """click's usage error (unknown option, missing or malformed value) as one line, with where to
    look: typer would draw it in a box over several lines. An unknown option names only the options
    close to it (click's own list, at difflib's loose default, offers `--fid` for `--sed`)."""
    from fa_rules.core.errors import close_names

    message = " ".join(error.format_message().split()).rstrip(".")
    if type(error).__name__ == "NoSuchOption" and error.ctx is not None:
        params = error.ctx.command.get_params(error.ctx)  # --help included
        known = [opt for param in params for opt in param.opts if opt.startswith("--")]
        close = close_names(error.option_name, known)
        message = f"No such option: {error.option_name}" + (f" (did you mean {', '.join(close)}?)" if close else "")
    command = error.ctx.command_path if error.ctx is not None else "fa-rules"
    return f"{message} (see '{command} --help')"
