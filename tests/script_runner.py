"""`run_script`: a benchmark script run in this process as `python SCRIPT ARGS` would run it (its
directory first on the path, `__main__`, one torch thread as the reports use), giving its exit
status, standard output and standard error. A new interpreter would spend about 4 s importing
torch; the scripts' own code, output and exit statuses are what the tests check."""

from __future__ import annotations

import contextlib
import io
import runpy
import subprocess
import sys
from pathlib import Path

import torch


def run_script(script: Path, *args, threads: int = 1) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    argv = [str(script), *map(str, args)]
    saved_argv, saved_path, saved_threads = sys.argv, list(sys.path), torch.get_num_threads()
    sys.argv, sys.path[:0] = argv, [str(Path(script).parent)]
    torch.set_num_threads(threads)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:  # argparse's errors and the scripts' own exits, as the interpreter reports them
        if isinstance(exit_.code, str):
            err.write(exit_.code + "\n")
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
