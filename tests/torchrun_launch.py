"""What the tests that start two processes under torchrun share: the launcher, the skip marker for a
machine without it, and the environment the processes start from."""

import os
import shutil
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = shutil.which("torchrun")
# A free port per test process, not torchrun's fixed 29500: pytest-xdist workers launch at the same time
LAUNCH = [TORCHRUN, "--nproc_per_node", "2", "--monitor-interval", "1", "--master-port", str(_free_port())]
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH")


def launch_env() -> dict:
    """This process's environment with one thread per process and none of an enclosing torchrun's
    rendezvous variables (or the launched processes would join that one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env
