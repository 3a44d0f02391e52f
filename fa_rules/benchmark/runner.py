"""Cells and the runner: one training run per (rule, seed, varied settings), resumable."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue as queue_module
import re
import signal
import stat
import statistics
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from fa_rules.core.checkpoint import process_alive, remove_stale_tmp_files, write_json, write_or_explain
from fa_rules.core.config import TrainConfig
from fa_rules.core.errors import UserError, error_line
from fa_rules.core.trainer import CONFIG_FILE, Diverged, resolve_device
from fa_rules.benchmark.cells import Cell, check_cells, plan_cells
from fa_rules.benchmark.report import _machine_info, record_machine, write_outputs
from fa_rules.benchmark.suite import CELL_FILE, LOCK_FILE, MACHINE_JSON, ROW_FILE, RUNS_DIR, SUITE_JSON, Suite
from fa_rules.benchmark.timing import DEFAULT_STEPS, group_key, ratio_seconds, time_group
from fa_rules.measures.run import measure_fid, measure_probe, time_per_sample

def _first_line(e: BaseException) -> str:
    if isinstance(e, (UserError, Diverged)):  # messages written for the user: no type name
        text = str(e).strip().splitlines()
        return text[0] if text else ""
    return error_line(e)


def _base_row(cell: Cell, run_dir: Path, root: Path) -> dict:
    row = {"rule": cell.entry.label, "rule_name": cell.entry.name, "seed": cell.seed, **cell.point,
           "status": None, "error": None, "notes": None, "dataset": cell.config.dataset,
           "model": cell.config.model, "epochs": cell.config.epochs}
    row["run_dir"] = run_dir.relative_to(root).as_posix() if run_dir.is_relative_to(root) else str(run_dir)
    if cell.entry.tuning:  # a tuned suite's final cell: how its settings were found (fa_rules.benchmark.tune)
        row["tuning"] = cell.entry.tuning
    return row


def _from_summary(summary: dict) -> dict:
    out = {k: summary.get(k) for k in ("task", "test_accuracy", "test_loss", "test_recon_mse", "fid",
                                        "probe_accuracy", "step_time_s", "peak_saved_bytes", "peak_cuda_bytes",
                                        "params", "epochs")}
    out["model"] = summary.get("model")
    if out["test_accuracy"] is not None:
        out["test_error"] = 1.0 - out["test_accuracy"]
    out["params_total"] = sum(summary.get("params_by_group", {}).values()) or summary.get("params")
    angles = summary.get("alignment_angle_deg")
    if angles:
        out["alignment_angle_per_block_deg"] = list(angles)
        out["alignment_angle_deg"] = statistics.fmean(angles)
    out["train_loss"] = summary.get("train_loss")
    for key in ("validation_accuracy", "validation_loss", "validation_split"):  # a run on a validation split
        out[key] = summary.get(key)
    if out["validation_accuracy"] is not None:
        out["validation_error"] = 1.0 - out["validation_accuracy"]
    return {k: v for k, v in out.items() if v is not None}



def _extras(trainer, run_dir: Path, measure: dict, row: dict) -> None:
    """Measurements beyond the trainer's summary; a failing one leaves a note, not a failed cell."""
    notes = []

    def attempt(what, fn):
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except ImportError as e:
            notes.append(f"{what}: not available in this installation ({e.name or e})")
        except Exception as e:
            notes.append(f"{what}: {_first_line(e)}")
        return None

    generative = trainer.rule.sample is not None
    if generative:
        row["time_per_sample_s"] = attempt(
            "time per sample", lambda: time_per_sample(trainer, measure["sample_batch"], measure["sample_repeats"]))
    if measure["fid"] and generative and row.get("fid") is None:
        row["fid"] = attempt("fid", lambda: measure_fid(trainer, measure["fid_samples"]))
    if measure["probe"] and row.get("probe_accuracy") is None:
        row["probe_accuracy"] = attempt("probe", lambda: measure_probe(trainer))
    for key in ("time_per_sample_s", "fid", "probe_accuracy"):
        if row.get(key) is None:
            row.pop(key, None)
    row["notes"] = "; ".join(notes) or None


def run_cell(cell: Cell, run_dir: Path, root: Path, measure: dict, on_epoch: Callable | None = None) -> dict:
    """Train one cell (or continue its interrupted run) and return its row; never raises for a rule's
    failure or divergence (the row says why). KeyboardInterrupt passes through."""
    from fa_rules.runs import new_trainer, resume_trainer

    row = _base_row(cell, run_dir, root)
    start = time.perf_counter()
    trainer, earlier = None, 0.0
    try:
        if (run_dir / CONFIG_FILE).is_file():  # interrupted earlier: continue from the last epoch
            trainer = resume_trainer(run_dir, cell.config.epochs, progress=False)
            earlier = sum(h.get("epoch_time_s") or 0.0 for h in trainer.history)  # time spent before
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer = new_trainer(copy.deepcopy(cell.config), run_dir, progress=False)
        if on_epoch is not None:
            save = trainer.save

            def save_and_report():  # the trainer saves once per epoch: report progress there
                save()
                on_epoch(trainer.epoch, trainer.history[-1])

            trainer.save = save_and_report
        summary = trainer.run()
    except KeyboardInterrupt:
        raise
    except Diverged as e:
        row.update(status="diverged", error=_first_line(e))
        if trainer is not None and trainer.history:
            row["train_loss"] = trainer.history[-1].get("train_loss")
    except Exception as e:  # a broken or unknown rule must not stop the suite
        row.update(status="failed", error=_first_line(e))
    else:
        row.update(_from_summary(summary))
        row["status"] = "ok"
        _extras(trainer, run_dir, measure, row)
    row["train_time_s"] = earlier + time.perf_counter() - start
    return row


def _read_json(path: Path):
    """The JSON in `path`, or None when it is missing or damaged (half-written, not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


# where the data lives and how often the test set is evaluated do not change what a cell trains
_NOT_TRAINED = ("data_dir", "eval_every")


def check_cell_dir(run_dir: Path, cell: Cell) -> None:
    """A cell directory from an earlier run must hold this cell's settings (else a one-line error).
    A setting missing from the stored cell (written before the setting existed) is its default."""
    stored = _read_json(run_dir / CELL_FILE)
    if not isinstance(stored, dict):  # none yet, or damaged: rewritten before the cell runs again
        return
    wanted = cell.config.to_dict()
    defaults = TrainConfig().to_dict()
    for k in sorted(set(stored) | set(wanted)):
        ran = stored.get(k, defaults.get(k))
        if k not in _NOT_TRAINED and ran != wanted.get(k):
            raise UserError(
                f"{run_dir} was run with {k}={ran!r}, this suite asks for {wanted.get(k)!r}; "
                f"use another --out (or delete {run_dir})")


def _load_cell(run_dir: Path, cell: Cell, root: Path) -> dict | None:
    """The finished row of a cell; None if it must run, continue, or be retried after a failure.

    A failed cell keeps its directory: the retry continues from its last epoch checkpoint (a
    transient error late in a long cell costs one epoch, not the cell). A damaged row.json counts
    as unfinished: the cell resumes (a finished run only re-evaluates)."""
    row = _read_json(run_dir / ROW_FILE)
    if not isinstance(row, dict) or row.get("status") not in ("ok", "diverged") \
            or row.get("rule") != cell.entry.label or row.get("seed") != cell.seed:
        return None
    row["run_dir"] = run_dir.relative_to(root).as_posix()
    return row


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """Hold DIR/.benchmark.lock while running, so a second process on one --out is refused (one line).

    The lock is an flock on the file, which the kernel releases when its holder ends, however it
    ends: what the file holds (a dead or an unrelated process's pid, nothing) never refuses a run. The
    holder writes its pid there for the message. Where flock is unavailable (not POSIX, some network
    filesystems) the pid decides instead: a live process's refuses, a dead one's is taken over.
    The file is opened without following a symlink (one planted there is refused, its target never
    truncated), and it must be a regular file with no other name. Holding the lock, the temporary files that killed
    writers left in DIR are removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the pid alone decides
        fcntl = None
    path = Path(out_dir) / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO: no wait
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link, not a lock file; remove it (rm {path}) and run again") \
                from None
        raise UserError(f"cannot write {path} ({e.strerror or e}); is {out_dir} writable?") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # truncating it would change another file
            raise UserError(f"{path} is not a lock file (a FIFO, a device or a hard link to another file); "
                            f"remove it (rm {path}) and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            acquired = True
        except BlockingIOError:  # a live process holds it
            acquired = False
        except (OSError, AttributeError):  # no flock here (some network filesystems): the pid alone decides
            acquired = None
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else None
        if acquired is None:
            acquired = pid is None or pid == os.getpid() or not process_alive(pid)
        if not acquired:
            who = f"process {pid}" if pid is not None else "another process"
            raise UserError(f"{out_dir} is in use by another benchmark ({who}); wait for it to finish, "
                            f"or use another --out")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_tmp_files(out_dir)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: an empty lock file is free (the file itself stays)
    finally:
        os.close(fd)  # also drops the flock


Event = Callable[[str, int, dict], None]  # (kind, cell index, payload)


def run_suite(suite: Suite, out_dir: Path, on_event: Event | None = None, command: str | None = None,
              workers: int | str = 1, cluster: str | None = None, tune: str = "run",
              say: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or finish) every cell of `suite` into `out_dir`; write results, report and plots.
    `workers` > 1 trains up to that many cells at once, each in a worker process (`check_workers`);
    `cluster` sends them to a Ray cluster as tasks (fa_rules.benchmark.cluster.check_cluster).

    A suite with [tune] first tunes every rule (fa_rules.benchmark.tune; `tune`: "run" tunes or
    finishes tuning, then the cells; "only" tunes and returns no rows; "skip" runs the cells with
    the stored studies' best settings), `say` getting a line per trial.

    Events: ("skip", i, row), ("start", i, {}), ("epoch", i, record), ("done", i, row).
    """
    from fa_rules.benchmark.cluster import check_cluster

    workers = check_workers(workers)
    cluster = check_cluster(cluster, workers)
    tuning = _check_tune_mode(tune, suite)
    out_dir = Path(out_dir)
    if tuning is not None:  # its search spaces at every bound, and (skip) the studies in place
        tuning.check_tune(suite)
        if tune == "skip":
            tuning.check_studies(suite, out_dir)
    cells = plan_cells(tuning.final_suite(suite) if tuning else suite)  # every check that needs no directory
    check_cells(cells, suite.source or "suite")                         # comes first: nothing is written
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission
        raise UserError(f"cannot use {out_dir} as the output directory ({e.strerror or e})") from None
    with output_lock(out_dir):
        if tuning is not None:
            summary = (tuning.write_summary(suite, out_dir) if tune == "skip"
                       else tuning.run_tuning(suite, out_dir, workers, cluster, say))
            if tune == "only":
                return []
            suite = tuning.final_suite(suite, summary)
            cells = plan_cells(suite)
        return _run_cells(suite, cells, out_dir, on_event, command, workers, cluster)


def _check_tune_mode(mode: str, suite: Suite):
    """The tuning module for a suite with [tune] (None without), `mode` checked against it."""
    if mode not in ("run", "only", "skip"):
        raise ValueError(f"tune must be run, only or skip, got {mode!r}")
    if not suite.tune:
        if mode != "run":
            raise UserError(f"--{'tune-only' if mode == 'only' else 'skip-tune'} needs a suite with a [tune] table")
        return None
    from fa_rules.benchmark import tune as tuning

    return tuning


def _write_json(path: Path, obj) -> None:
    """A file of the benchmark directory; a full disk is one line saying how to continue."""
    write_or_explain(write_json, path, obj, "run the same command again to continue (finished cells are kept)")


def time_interleaved(cells: list[Cell], rows: dict[int, dict], out_dir: Path, steps: int) -> None:
    """The timing phase (see fa_rules.benchmark.timing): per seed and varied setting, the cells that
    trained stepping in turn; adds to their rows (and row files) the medians by both clocks,
    `interleaved_step_cpu_s` and `interleaved_step_wall_s`, and as `interleaved_step_time_s` (the
    ratio's) the one `ratio_seconds` picks for the cell's device. A group timed before (a resumed
    benchmark) is not timed again."""
    groups: dict[tuple, list[int]] = {}
    for i, cell in enumerate(cells):
        if rows.get(i, {}).get("status") == "ok":
            groups.setdefault(group_key(cell), []).append(i)
    for members in groups.values():
        if all(rows[i].get("interleaved_step_time_s") is not None for i in members):
            continue
        for i, median in zip(members, time_group([cells[i] for i in members], steps)):
            if median is not None:
                rows[i]["interleaved_step_time_s"] = ratio_seconds(median, resolve_device(cells[i].config.device))
                rows[i]["interleaved_step_cpu_s"], rows[i]["interleaved_step_wall_s"] = median.cpu, median.wall
                _write_json(out_dir / RUNS_DIR / cells[i].dirname / ROW_FILE, rows[i])


def _run_cells(suite: Suite, cells: list[Cell], out_dir: Path, on_event: Event | None, command: str | None,
               workers: int = 1, cluster: str | None = None) -> list[dict]:
    _write_json(out_dir / SUITE_JSON, {**suite.to_dict(), "cells": len(cells)})
    emit = on_event or (lambda *a: None)
    rows: dict[int, dict] = {}
    recorded = False
    for_workers: list[int] = []  # with workers > 1 or a cluster: the cells to train, in planned order

    def save_all(plots: bool) -> None:
        ordered = [rows[i] for i in sorted(rows)]
        write_outputs(suite, out_dir, ordered, plots=plots, command=command)

    def finish(i: int, row: dict) -> None:
        """A cell's row, from this process or a worker: its row file, then every output."""
        _write_json(out_dir / RUNS_DIR / cells[i].dirname / ROW_FILE, row)
        rows[i] = row
        emit("done", i, row)
        save_all(plots=False)

    for cell in cells:  # before anything runs or is rewritten
        check_cell_dir(out_dir / RUNS_DIR / cell.dirname, cell)
    if (out_dir / MACHINE_JSON).exists() and _machine_info(out_dir) is None:
        record_machine(out_dir)  # damaged: rebuilt (naming this machine) rather than crashing the report
        recorded = True
    try:
        for i, cell in enumerate(cells):
            run_dir = out_dir / RUNS_DIR / cell.dirname
            row = _load_cell(run_dir, cell, out_dir)
            if row is not None:
                rows[i] = row
                emit("skip", i, row)
                continue
            if not recorded:  # the report names the machine(s) that trained the cells, not the renderer
                record_machine(out_dir)
                recorded = True
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / CELL_FILE, cell.config.to_dict())
            if workers > 1 or cluster:
                for_workers.append(i)
                continue
            emit("start", i, {})
            row = run_cell(cell, run_dir, out_dir, suite.measure,
                           on_epoch=lambda epoch, record, _i=i: emit("epoch", _i, record))
            finish(i, row)
        if for_workers and cluster:
            from fa_rules.benchmark.cluster import run_cells_on_ray

            run_cells_on_ray(cells, for_workers, out_dir, suite.measure, cluster, emit, finish)
        elif for_workers:
            _run_in_workers(cells, for_workers, out_dir, suite.measure, workers, emit, finish)
        if suite.measure.get("timing", True):
            time_interleaved(cells, rows, out_dir, suite.measure.get("timing_steps", DEFAULT_STEPS))
    finally:  # also on Ctrl-C: every finished row is kept, plots drawn
        if rows:
            save_all(plots=True)
    return [rows[i] for i in sorted(rows)]


# -- workers: `--workers N` trains up to N cells at once, each in a worker process ----------------

MAX_WORKERS = 64
# tests only: a cell's dirname; the worker training that cell SIGKILLs itself after the cell's
# first epoch checkpoint (a worker killed mid-cell, as the OOM killer or `kill -9` would)
KILL_WORKER_FOR_TEST = "FA_RULES_TEST_KILL_WORKER_AFTER_EPOCH1"
_WORKER_DIED = ("a worker process ended abruptly (killed, out of memory?) and its pool stopped this cell; "
                "run the same command again to continue it from its last finished epoch")


def check_workers(value) -> int:
    """The number of worker processes (an int from Python, text from the command line), checked in
    this one place: an integer in 1..MAX_WORKERS, else one line."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= MAX_WORKERS:
        raise UserError(f"--workers must be an integer in 1..{MAX_WORKERS}, got {str(value)!r}")
    return int(text)


_to_parent = None  # in a worker process: the queue its cells' events go to


def worker_context():
    """How worker processes start: forked from a fork server that has imported torch and the
    runner once (a fresh single-threaded process, so no fork of one holding torch's threads or a
    CUDA context), which saves every worker the seconds of importing them; spawned where there is
    no fork server (Windows)."""
    import multiprocessing

    try:
        context = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    context.set_forkserver_preload(["fa_rules.benchmark.runner"])
    return context


def _end_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its benchmark: after the parent is killed, a rerun would otherwise
    train the same cell in two processes. The worker's own parent is the benchmark process (spawned)
    or the fork server, which ends when the benchmark process does. Linux ends the worker with that
    parent (PR_SET_PDEATHSIG); and a thread checks every second that the benchmark process lives."""
    immediate = os.getppid()
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != immediate:  # that parent ended before the request
                os._exit(1)
    except (OSError, AttributeError, TypeError):  # no prctl (not Linux)
        pass

    def watch() -> None:
        while process_alive(parent_pid):
            time.sleep(1.0)
        os._exit(1)

    if not process_alive(parent_pid):
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _start_worker(to_parent, counter, threads: int, cuda: bool, parent_pid: int, environment: dict) -> None:
    """Once in each worker process: the benchmark process's environment as it is now (the fork
    server kept the one it started with), its share of the CPU threads, on CUDA its GPU (worker k
    takes cuda:(k % device_count) as its current device, which `cuda` and `auto` resolve to), and
    Ctrl-C left to the parent, which stops every worker."""
    global _to_parent
    os.environ.clear()
    os.environ.update(environment)
    _end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _to_parent = to_parent
    import torch

    torch.set_num_threads(threads)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if cuda and torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())


def waiting_events(events, empty: type[Exception] = queue_module.Empty):
    """The events already on `events` (a queue of workers' or tasks' progress, whose `get_nowait`
    raises `empty` when nothing waits), oldest first, without blocking."""
    while True:
        try:
            yield events.get_nowait()
        except empty:
            return


def worker_pool(size: int, cuda: bool):
    """`size` worker processes (`_start_worker` in each) and the queue their events come back on."""
    import torch

    context = worker_context()
    events = context.Queue()
    executor = ProcessPoolExecutor(
        size, mp_context=context, initializer=_start_worker,
        initargs=(events, context.Value("i", 0), max(1, torch.get_num_threads() // size), cuda, os.getpid(),
                  dict(os.environ)))
    return executor, events


def _cell_in_worker(i: int, cell: Cell, run_dir: Path, root: Path, measure: dict) -> dict:
    """`run_cell` in a worker process; its start and epochs go to the parent's live table."""
    kill_after_epoch1 = os.environ.get(KILL_WORKER_FOR_TEST) == cell.dirname

    def on_epoch(epoch: int, record: dict) -> None:
        if kill_after_epoch1 and epoch == 1:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        _to_parent.put(("epoch", i, dict(record)))  # pickled later, by the queue's thread: a copy

    _to_parent.put(("start", i, {}))
    return run_cell(cell, run_dir, root, measure, on_epoch=on_epoch)


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Ctrl-C or an error in the parent: running cells stop now (each resumes from its last epoch
    checkpoint on a rerun), queued ones never start. The executor has no public way to stop running
    workers before Python 3.14, hence its process table."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


def _run_in_workers(cells: list[Cell], todo: list[int], root: Path, measure: dict, workers: int,
                    emit: Event, finish: Callable[[int, dict], None]) -> None:
    """Train the cells `todo` in up to `workers` worker processes and hand each row to `finish` (in
    this process, as cells end). A cell that raises is a failed row. A worker that dies breaks its
    pool: the cells that had started get a failed row (a rerun continues them from their last epoch)
    and the others run in a new pool."""
    import torch

    cuda = torch.cuda.is_available() and any(cells[i].config.device in ("auto", "cuda") for i in todo)
    while todo:
        executor, events = worker_pool(min(workers, len(todo)), cuda)
        started: set[int] = set()
        finished: set[int] = set()
        retry: list[int] = []
        broken = None

        def relay() -> None:
            for kind, i, payload in waiting_events(events):
                if i not in finished:  # an epoch's message can trail its cell's result
                    started.add(i)
                    emit(kind, i, payload)

        try:
            futures = {executor.submit(_cell_in_worker, i, cells[i], root / RUNS_DIR / cells[i].dirname, root,
                                       measure): i for i in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                relay()
                for future in sorted(done, key=futures.get):
                    i = futures[future]
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool) and i not in started:
                        broken = error
                        retry.append(i)
                        continue
                    if error is None:
                        row = future.result()
                    else:
                        row = _base_row(cells[i], root / RUNS_DIR / cells[i].dirname, root)
                        row.update(status="failed", error=_WORKER_DIED if isinstance(error, BrokenProcessPool)
                                   else _first_line(error))
                    finished.add(i)
                    finish(i, row)
        except BaseException:
            _stop_workers(executor)
            raise
        executor.shutdown(wait=True)
        events.close()
        if broken is not None and not finished:  # no worker ever ran a cell: another pool would not either
            for i in retry:
                row = _base_row(cells[i], root / RUNS_DIR / cells[i].dirname, root)
                row.update(status="failed", error=f"no worker process could run it: {_first_line(broken)}")
                finish(i, row)
            retry = []
        todo = sorted(retry)
