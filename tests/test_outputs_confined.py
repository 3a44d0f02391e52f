"""Nothing is written outside the run directory (issue 37, parts 2 and 6): every output is written
atomically through a new temporary file and never through a symlink (a symlink at an output's name
is replaced, its target left byte-identical), a full disk is one line and leaves the earlier file
whole, killed writers' temporary files are removed when the directory is next used, and the
benchmark's lock is an flock (a pid in the file never refuses a run; a symlinked lock is refused)."""

import builtins
import errno
import fcntl
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fa_rules import benchmark as bench
from fa_rules import runs
from fa_rules.core.checkpoint import atomic_write_bytes, remove_stale_tmp_files
from fa_rules.core.errors import UserError
from test_atomic_writes import HalfWriter
from test_hardening_core import assert_one_line, main_in_process, tiny_config

REAL_OPEN, REAL_IO_OPEN = builtins.open, io.open

TINY_SUITE = {"rules": ["backprop"], "settings": {"epochs": 1, "depth": 1, "width": 8, "batch_size": 256},
              "measure": {"timing": False}}


def plant_link(path: Path, outside: Path) -> Path:
    """A symlink at `path` to a file of its own in `outside` (a folder outside the run), which the
    output must never change; returns that file."""
    outside.mkdir(exist_ok=True)
    target = outside / f"precious-{path.name}"
    target.write_bytes(b"precious: not the program's file\n")
    path.symlink_to(target)
    return target


def assert_untouched(links: dict[Path, Path]) -> None:
    for path, target in links.items():
        assert target.read_bytes() == b"precious: not the program's file\n", f"{path.name} wrote through its symlink"
        assert not path.is_symlink() and path.is_file() and path.stat().st_size > 0, path  # replaced by the output


def tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("confined") / "vae"
    runs.train(tiny_config(rule="vae", latent_dim=4, model_options={"width": 16}), run, progress=False)
    return run


# 1. symlinks at output names: replaced, their targets untouched --------------------------------------

def test_run_pictures_are_skipped_when_the_environment_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_RULES_RUN_PICTURES", "0")
    runs.train(tiny_config(), tmp_path / "off", progress=False)
    monkeypatch.setenv("FA_RULES_RUN_PICTURES", "1")
    runs.train(tiny_config(), tmp_path / "on", progress=False)
    assert not list((tmp_path / "off").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "on").glob("*.png")) == ["alignment.png", "curves.png"]


def test_train_pictures_replace_a_symlink_and_leave_its_target_alone(tmp_path, run_pictures):
    run = tmp_path / "run"
    run.mkdir()
    links = {run / name: plant_link(run / name, tmp_path / "outside") for name in ("curves.png", "alignment.png")}
    runs.train(tiny_config(), run, progress=False)
    assert_untouched(links)
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert not tmp_files(run)


@pytest.mark.parametrize("command, name", [(["sample", "--num", "4"], "samples.png"),
                                           (["sample", "--num", "4", "--interpolate"], "interpolation.png"),
                                           (["reconstruct", "--num", "4"], "reconstructions.png")])
def test_inspection_pictures_replace_a_symlink_and_leave_its_target_alone(command, name, vae_run, tmp_path,
                                                                           monkeypatch, capsys):
    link = vae_run / name
    link.unlink(missing_ok=True)
    target = plant_link(link, tmp_path / "outside")
    code, err = main_in_process(monkeypatch, capsys, command[0], vae_run, *command[1:])
    assert code == 0, err
    assert_untouched({link: target})
    assert link.read_bytes().startswith(b"\x89PNG")
    assert not tmp_files(vae_run)


def test_an_unknown_picture_extension_is_refused_before_any_work(vae_run, tmp_path, monkeypatch, capsys):
    code, err = main_in_process(monkeypatch, capsys, "sample", vae_run, "--num", "4", "--out", tmp_path / "grid.foo")
    assert code == 2
    assert_one_line(err, "grid.foo: unknown image extension '.foo'; name a .png file (e.g. ")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def benchmark_out(tmp_path_factory):
    """A one-cell benchmark run into a DIR whose outputs were symlinks to files outside it."""
    root = tmp_path_factory.mktemp("confined-benchmark")
    out = root / "out"
    out.mkdir()
    names = ("results.json", "results.csv", "report.md", "suite.json", "machine.json", "learning_curves.png",
             "metric_vs_step_time.png")
    links = {out / name: plant_link(out / name, root / "outside") for name in names}
    suite = bench.suite_from_dict(TINY_SUITE)
    rows = bench.run_suite(suite, out)
    return suite, out, rows, links


def test_benchmark_outputs_replace_a_symlink_and_leave_its_target_alone(benchmark_out, tmp_path):
    suite, out, rows, links = benchmark_out
    assert [r["status"] for r in rows] == ["ok"]
    copy = tmp_path / "copy.md"
    links[copy] = plant_link(copy, tmp_path / "outside")
    bench.write_report_copy(suite, out, copy)
    assert_untouched(links)
    assert not tmp_files(out)


def test_a_temporary_file_name_taken_by_a_symlink_is_not_followed(tmp_path):
    path = tmp_path / "summary.json"
    target = plant_link(tmp_path / f".summary.json.tmp-{os.getpid()}", tmp_path / "outside")
    atomic_write_bytes(path, b"{}\n")
    assert path.read_bytes() == b"{}\n"
    assert target.read_bytes() == b"precious: not the program's file\n"
    assert not tmp_files(tmp_path)


# 2. the benchmark's lock -----------------------------------------------------------------------------

def test_a_lock_file_naming_a_live_unrelated_process_does_not_refuse(tmp_path):
    lock = tmp_path / bench.LOCK_FILE
    lock.write_text(f"{os.getppid()}\n")  # alive, and no benchmark: a pid is no lock
    with bench.output_lock(tmp_path):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert lock.read_text() == ""


def test_a_lock_held_with_flock_refuses_in_one_line(tmp_path):
    lock = tmp_path / bench.LOCK_FILE
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        with pytest.raises(UserError, match=r"in use by another benchmark \(process 4242\); wait for it"):
            with bench.output_lock(tmp_path):
                pass
    with bench.output_lock(tmp_path):  # released: free again
        pass


def test_a_symlinked_lock_is_refused_and_its_target_not_truncated(tmp_path):
    target = plant_link(tmp_path / bench.LOCK_FILE, tmp_path / "outside")
    with pytest.raises(UserError, match=r"\.benchmark\.lock is a symbolic link, not a lock file; remove it"):
        with bench.output_lock(tmp_path):
            pass
    assert target.read_bytes() == b"precious: not the program's file\n"


def test_a_fifo_as_the_lock_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / bench.LOCK_FILE)
    with pytest.raises(UserError, match=r"\.benchmark\.lock is not a lock file \(a FIFO"):
        with bench.output_lock(tmp_path):
            pass


# 3. temporary files of killed writers -----------------------------------------------------------------

def test_a_rerun_train_removes_the_temporary_config_a_killed_run_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / f".config.json.tmp-{dead_pid()}"  # killed before config.json was in place
    stale.write_bytes(b'{"rule": "backp')
    runs.new_trainer(tiny_config(), run, progress=False)  # `train --out RUN` again, not --resume
    assert (run / "config.json").is_file()
    assert not tmp_files(run)


def test_only_dead_processes_temporary_files_are_removed(tmp_path):
    dead = tmp_path / f".results.json.tmp-{dead_pid()}"
    live = tmp_path / f".results.json.tmp-{os.getppid()}"  # a live process may be writing it
    link = tmp_path / f".report.md.tmp-{dead_pid()}"
    for path in (dead, live):
        path.write_bytes(b"half")
    target = plant_link(link, tmp_path / "outside")
    assert sorted(remove_stale_tmp_files(tmp_path)) == sorted([dead, link])
    assert live.exists() and not dead.exists() and not link.is_symlink()
    assert target.read_bytes() == b"precious: not the program's file\n"


def test_the_benchmark_removes_killed_writers_temporary_files(tmp_path):
    stale = tmp_path / f".results.json.tmp-{dead_pid()}"
    stale.write_bytes(b"[{")
    with bench.output_lock(tmp_path):
        assert not stale.exists()


def test_the_fid_feature_cache_writes_atomically_and_removes_killed_writers_temporary_files(tmp_path, monkeypatch):
    from fa_rules.measures import fid
    from fa_rules.plugins.datasets import load_digits
    from test_fid import CountingFeatures

    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".real-0123.npy.tmp-{dead_pid()}"
    stale.write_bytes(b"\x93NUMPY")
    monkeypatch.setenv(fid.FID_CACHE_ENV, str(cache))
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"0" * 10)
    fid.real_features(load_digits().test_x[:4], CountingFeatures(), weights)
    assert len(list(cache.glob("real-*.npy"))) == 1
    assert not tmp_files(cache) and not list(cache.glob("*.tmp"))


# 4. a full disk: one line, the earlier file whole, no empty or partial file -----------------------------

@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(folder)`: files opened for writing in `folder` (by name or by descriptor) fill the
    disk midway."""
    real_open = builtins.open

    def install(folder: Path):
        def open_on_full_disk(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.abspath(file)
            return HalfWriter(f, OSError(errno.ENOSPC, "No space left on device")) if any(m in mode for m in "wax+") and Path(name).parent == folder else f

        monkeypatch.setattr(builtins, "open", open_on_full_disk)
        monkeypatch.setattr(io, "open", open_on_full_disk)

    return install


def assert_kept(folder: Path, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        assert (folder / name).read_bytes() == data, f"{name} was changed by the failed write"
    assert not tmp_files(folder)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_drawing_a_sample_grid_is_one_line_and_keeps_the_old_picture(vae_run, tmp_path, monkeypatch,
                                                                                       capsys, full_disk):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the earlier picture")
    full_disk(tmp_path)
    code, err = main_in_process(monkeypatch, capsys, "sample", vae_run, "--num", "4", "--out", out)
    monkeypatch.undo()
    assert code == 2
    assert_one_line(err, f"cannot write {out}: No space left on device")
    assert_kept(tmp_path, {"grid.png": b"the earlier picture"})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_drawing_curves_is_one_line_and_keeps_the_old_picture(tmp_path, monkeypatch, full_disk):
    from fa_rules.plots import plot_curves

    (tmp_path / "curves.png").write_bytes(b"the earlier picture")
    full_disk(tmp_path)
    with pytest.raises(UserError, match=r"cannot write .*curves\.png \(No space left on device\)"):
        plot_curves([{"epoch": 1, "train_loss": 2.0, "test_accuracy": 0.5}], tmp_path / "curves.png")
    monkeypatch.undo()
    assert_kept(tmp_path, {"curves.png": b"the earlier picture"})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_probe_writes_the_summary_is_one_line_and_keeps_it(vae_run, monkeypatch, capsys, full_disk):
    before = {name: (vae_run / name).read_bytes() for name in ("summary.json", "config.json", "checkpoint.pt")}
    full_disk(vae_run)
    code, err = main_in_process(monkeypatch, capsys, "probe", vae_run)
    monkeypatch.undo()
    assert code == 2
    assert_one_line(err, f"cannot write {vae_run / 'summary.json'} (No space left on device); its earlier version "
                         "is kept")
    assert_kept(vae_run, before)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_the_benchmark_writes_results_is_one_line_and_keeps_them(benchmark_out, monkeypatch,
                                                                                 full_disk):
    suite, out, rows, _ = benchmark_out
    before = {name: (out / name).read_bytes() for name in ("results.json", "results.csv", "report.md")}
    full_disk(out)
    with pytest.raises(UserError, match=r"cannot write .*results\.json \(No space left on device\); its earlier "
                                        r"version is kept: free space \(or fix the folder\) and run the same command "
                                        r"again to continue \(finished cells are kept in "):
        bench.write_outputs(suite, out, [{**rows[0], "notes": "changed"}])
    monkeypatch.undo()
    assert_kept(out, before)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_train_writes_its_summary_is_one_line_and_resume_writes_it(tmp_path, monkeypatch, capsys,
                                                                                  full_disk):
    """The last write of a run: the checkpoint is saved, the summary is not; --resume finishes it."""
    from fa_rules.core import trainer as trainer_module

    run = tmp_path / "run"
    real_finish = trainer_module.Trainer.finish

    def finish_on_full_disk(self):
        full_disk(run)
        try:
            return real_finish(self)
        finally:  # the rest of the run (and the test) writes normally
            builtins.open, io.open = REAL_OPEN, REAL_IO_OPEN

    monkeypatch.setattr(trainer_module.Trainer, "finish", finish_on_full_disk)
    code, err = main_in_process(monkeypatch, capsys, "train", "--rule", "backprop", "--dataset", "digits", "--width",
                                "8", "--epochs", "1", "--batch-size", "256", "--out", run, "-q")
    monkeypatch.undo()
    assert code == 2
    assert_one_line(err, f"cannot write {run / 'summary.json'} (No space left on device)", f"--resume {run}")
    assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists() and not tmp_files(run)
    runs.resume_trainer(run, progress=False).run()
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_while_the_benchmark_writes_a_cell_file_is_one_line(tmp_path, monkeypatch, full_disk):
    suite = bench.suite_from_dict({"rules": ["backprop"], "settings": {"epochs": 1, "depth": 1, "width": 8,
                                                                        "batch_size": 256}})
    out = tmp_path / "out"
    out.mkdir()
    full_disk(out)  # suite.json, the first file the benchmark writes there
    with pytest.raises(UserError, match=r"cannot write .*suite\.json \(No space left on device\); its earlier "
                                        r"version is kept: .*run the same command again"):
        bench.run_suite(suite, out)
    monkeypatch.undo()
    assert not (out / "suite.json").exists() and not tmp_files(out)
