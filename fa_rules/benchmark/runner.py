"""Cells and the runner: one training run per (rule, seed, varied settings), resumable."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
import statistics
import time
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


def run_suite(suite: Suite, out_dir: Path, on_event: Event | None = None, command: str | None = None) -> list[dict]:
    """Run (or finish) every cell of `suite` into `out_dir`; write results, report and plots.

    Events: ("skip", i, row), ("start", i, {}), ("epoch", i, record), ("done", i, row).
    """
    out_dir = Path(out_dir)
    cells = plan_cells(suite)  # every check that needs no directory comes first: nothing is written
    check_cells(cells, suite.source or "suite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission
        raise UserError(f"cannot use {out_dir} as the output directory ({e.strerror or e})") from None
    with output_lock(out_dir):
        return _run_cells(suite, cells, out_dir, on_event, command)


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


def _run_cells(suite: Suite, cells: list[Cell], out_dir: Path, on_event: Event | None, command: str | None) -> list[dict]:
    _write_json(out_dir / SUITE_JSON, {**suite.to_dict(), "cells": len(cells)})
    emit = on_event or (lambda *a: None)
    rows: dict[int, dict] = {}
    recorded = False

    def save_all(plots: bool) -> None:
        ordered = [rows[i] for i in sorted(rows)]
        write_outputs(suite, out_dir, ordered, plots=plots, command=command)

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
            emit("start", i, {})
            row = run_cell(cell, run_dir, out_dir, suite.measure,
                           on_epoch=lambda epoch, record, _i=i: emit("epoch", _i, record))
            _write_json(run_dir / ROW_FILE, row)
            rows[i] = row
            emit("done", i, row)
            save_all(plots=False)
        if suite.measure.get("timing", True):
            time_interleaved(cells, rows, out_dir, suite.measure.get("timing_steps", DEFAULT_STEPS))
    finally:  # also on Ctrl-C: every finished row is kept, plots drawn
        if rows:
            save_all(plots=True)
    return [rows[i] for i in sorted(rows)]
