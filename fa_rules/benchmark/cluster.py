"""`fa-rules benchmark --cluster`: cells (and tuning trials) as tasks on a Ray cluster.

Ray does the scheduling: every cell is one Ray task that asks for the resources it needs (one CPU;
one GPU too where the cell's device is `cuda` or `auto` and the cluster has GPUs) and trains with
`run_cell` into the benchmark's output directory, which every node must see at the same path (a
shared filesystem). A task lost with its worker process or its node is run again by Ray (up to
`retries` times) and resumes from the cell's last epoch checkpoint, because `run_cell` continues a
run directory that holds its config file. A task that raises is a failed result, never retried.
The benchmark process keeps the lock, the live table (fed by a Ray queue), the outputs and the
timing phase. Ray is optional: `pip install "fa-rules[ray]"`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
from pathlib import Path
from typing import Callable

from fa_rules.benchmark.cells import Cell
from fa_rules.benchmark.runner import KILL_WORKER_FOR_TEST, Event, _base_row, _first_line, run_cell, waiting_events
from fa_rules.benchmark.suite import RUNS_DIR
from fa_rules.core.errors import UserError, error_line

INSTALL = 'pip install -e ".[ray]" in a checkout, or pip install "fa-rules[ray]"'
_FORMS = "ray, auto (the cluster at RAY_ADDRESS) or ray://HOST:PORT"
_CLIENT_ADDRESS = re.compile(r"ray://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_LOST = ("its Ray task was lost ({what}) and Ray's retries did not finish it; run the same command again "
         "to continue it from its last finished epoch")


def check_cluster(value: str | None, workers: int = 1) -> str | None:
    """The `--cluster` value, checked in this one place before anything is written: None or "" for
    no cluster; `ray` (ray.init(): the cluster at RAY_ADDRESS, else one started with `ray start` on
    this machine, else a new local one), `auto` (the cluster at RAY_ADDRESS, which must be set) or
    `ray://HOST:PORT` (Ray client). Anything else, Ray not installed, or `workers` > 1 beside a
    cluster (Ray decides how many cells run at once) is one line."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    client = _CLIENT_ADDRESS.fullmatch(text)
    if text not in ("ray", "auto") and client is None:
        raise UserError(f"--cluster must be {_FORMS}, got {str(value)!r}")
    if client is not None and not 1 <= int(client.group(1)) <= 65535:
        raise UserError(f"--cluster {text}: the port must be in 1..65535")
    if text == "auto" and not os.environ.get("RAY_ADDRESS", "").strip():
        raise UserError("--cluster auto needs RAY_ADDRESS (e.g. export RAY_ADDRESS=HEAD_IP:6379, as printed by "
                        "`ray start --head`); or use --cluster ray://HOST:10001")
    if workers > 1:
        raise UserError(f"--workers {workers} and --cluster {text} do not combine: on a cluster every cell is a "
                        "Ray task and Ray decides how many run at once; drop --workers")
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"--cluster needs Ray, which is not installed: {INSTALL}")
    if (client is not None or os.environ.get("RAY_ADDRESS", "").startswith("ray://")) \
            and importlib.util.find_spec("grpc") is None:
        raise UserError('--cluster ray://... (the Ray client) needs grpcio: pip install "ray[client]"')
    return text


@contextlib.contextmanager
def connected(address: str):
    """Ray, initialised for `address` (a `check_cluster` value) unless this process already is (then
    that connection is used and kept); a connection this made is closed on exit."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    try:
        # worker output stays in Ray's log files: it would tear the live table; rows carry the errors
        ray.init(address=None if address == "ray" else address, log_to_driver=False,
                 logging_level=logging.WARNING)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise UserError(f"cannot connect to the Ray cluster (--cluster {address}): {error_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def run_remote(fn: Callable, argument_tuples: list[tuple], resources: dict, address: str,
               on_result: Callable[[int, object, BaseException | None], None], retries: int = 3,
               poll: Callable[[], None] | None = None) -> None:
    """Run `fn(*args)` for each tuple of `argument_tuples` as a Ray task with `resources` (Ray's task
    options: num_cpus, num_gpus, memory, ...) and call `on_result(index, result, None)` or
    `on_result(index, None, error)` here as each finishes, `poll()` about every 0.5 s (and once at the
    end) when given. `fn` must be importable (a module-level function: Ray pickles it by reference).

    A task whose worker process or node is lost runs again, up to `retries` times; after that its
    error is Ray's (a `ray.exceptions.RayError`). A task that raises is not retried: its error is the
    exception `fn` raised. Ctrl-C (or any error here) cancels the tasks still running and re-raises.
    Connects per `connected(address)`."""
    with connected(address) as ray:
        task = ray.remote(max_retries=retries, retry_exceptions=False, **resources)(fn)
        refs = [task.remote(*args) for args in argument_tuples]
        index_of = {ref: k for k, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                if poll is not None:
                    poll()  # before the results: a cell's last epoch precedes its row
                for ref in sorted(done, key=index_of.get):
                    try:
                        result, error = ray.get(ref), None
                    except ray.exceptions.RayTaskError as e:  # fn raised: the original exception
                        result, error = None, (e.cause if isinstance(getattr(e, "cause", None), BaseException)
                                               else e)
                    except ray.exceptions.RayError as e:  # lost beyond its retries, cancelled, unpicklable
                        result, error = None, e
                    on_result(index_of[ref], result, error)
            if poll is not None:
                poll()
        except BaseException:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise


def _wants_gpu(cell: Cell) -> bool:
    device = str(cell.config.device)
    return device == "auto" or device.startswith("cuda")


def _cell_on_ray(i: int, cell: Cell, run_dir: Path, root: Path, measure: dict, events, threads: int,
                 kill_after_epoch1: bool) -> dict:
    """`run_cell` in a Ray task; its start and epochs go to the benchmark's live table. On a GPU
    task Ray has made its GPU the only visible one, so `cuda` and `auto` train there."""
    import torch

    torch.set_num_threads(threads)

    def on_epoch(epoch: int, record: dict) -> None:
        if kill_after_epoch1 and epoch == 1:  # tests only: this Ray worker dies as `kill -9` would end it
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        with contextlib.suppress(Exception):  # progress is best effort; the row is what counts
            events.put_nowait(("epoch", i, dict(record)))

    with contextlib.suppress(Exception):
        events.put_nowait(("start", i, {}))
    return run_cell(cell, run_dir, root, measure, on_epoch=on_epoch)


def run_cells_on_ray(cells: list[Cell], todo: list[int], root: Path, measure: dict, address: str,
                     emit: Event, finish: Callable[[int, dict], None]) -> None:
    """The Ray twin of the runner's `_run_in_workers`: train the cells `todo` as Ray tasks writing
    into `root` (the benchmark directory, the same path on every node) and hand each row to `finish`
    here as cells end. Each cell asks for one CPU and trains with one torch thread; a cell on
    `cuda` or `auto` also asks for one GPU when the cluster has any. A task lost with its worker or
    node is retried (3 times) and resumes from the cell's last epoch checkpoint; a cell that fails
    for good is a failed row that a rerun continues."""
    root = Path(root).resolve()  # a task's working directory is not this process's
    kill = os.environ.get(KILL_WORKER_FOR_TEST)
    with connected(address) as ray:
        from ray.util.queue import Empty, Queue

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"num_cpus": 1, "num_gpus": 1 if gpus and any(_wants_gpu(cells[i]) for i in todo) else 0}
        events = Queue()  # an actor: the tasks' progress, read back by `relay`
        finished: set[int] = set()

        def relay() -> None:
            for kind, i, payload in waiting_events(events, Empty):
                if i not in finished:  # an epoch's message can trail its cell's result
                    emit(kind, i, payload)

        def on_result(k: int, row: dict | None, error: BaseException | None) -> None:
            i = todo[k]
            finished.add(i)
            if error is not None or not isinstance(row, dict):
                run_dir = root / RUNS_DIR / cells[i].dirname
                row = _base_row(cells[i], run_dir, root)
                lost = isinstance(error, ray.exceptions.RayError)
                row.update(status="failed", error=_LOST.format(what=type(error).__name__) if lost
                           else _first_line(error) if error is not None else "the Ray task returned no row")
            finish(i, row)

        arguments = [(i, cells[i], root / RUNS_DIR / cells[i].dirname, root, measure, events,
                      int(resources["num_cpus"]), kill == cells[i].dirname) for i in todo]
        try:
            run_remote(_cell_on_ray, arguments, resources, address, on_result, poll=relay)
        finally:
            with contextlib.suppress(Exception):
                ray.kill(events.actor)
