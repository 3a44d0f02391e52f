"""`fa-rules benchmark --workers N`: cells train in spawned worker processes with the results of the
sequential run, a worker killed mid-cell is a failed row that a rerun finishes, and the flag is
checked before anything is written. Tiny MLPs on digits, one torch thread (as the reports use)."""

import json
from pathlib import Path

import pytest
import torch
from test_cli_errors import run_main
from typer.testing import CliRunner

from fa_rules import benchmark as bench
from fa_rules.benchmark import runner
from fa_rules.cli.app import app
from fa_rules.core import RuleSpec, UserError
from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.plugins.manager import get_registry

SUITE = """\
name = "workers"
rules = ["backprop", "feedback_alignment"]
seeds = 2

[settings]
dataset = "digits"
model = "mlp"
depth = 1
width = 16
epochs = 2
batch_size = 128
device = "cpu"

[measure]
timing = false
fid = false
"""


@pytest.fixture(autouse=True)
def one_thread():
    """OMP_NUM_THREADS=1 semantics in this process; the workers get max(1, 1 // N) = 1 thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "workers.toml"
    path.write_text(SUITE)
    return path


def benchmark_cli(suite_file: Path, out: Path, *flags: str):
    """`fa-rules benchmark SUITE --out OUT -q FLAGS` in this process (the Ray and tuning tests use it too)."""
    return CliRunner().invoke(app, ["benchmark", str(suite_file), "--out", str(out), "-q", *flags])


@pytest.fixture(scope="module")
def sequential(suite_file, tmp_path_factory) -> Path:
    """The reference: today's path, every cell in this process, one after another."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sequential") / "bench"
    result = benchmark_cli(suite_file, out, "--workers", "1")
    torch.set_num_threads(before)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if "time" not in k}  # step_time_s, train_time_s, ...


def _params(out: Path, row: dict) -> dict:
    return load_checkpoint(out / row["run_dir"] / "checkpoint.pt")["params"]


def _assert_same_results(out: Path, reference: Path) -> None:
    rows, expected = _rows(out), _rows(reference)
    assert [(r["rule"], r["seed"]) for r in rows] == [
        ("backprop", 0), ("feedback_alignment", 0), ("backprop", 1), ("feedback_alignment", 1)]  # planned order
    assert [_untimed(r) for r in rows] == [_untimed(r) for r in expected]
    assert all(r["status"] == "ok" and r["epochs"] == 2 for r in rows)
    for row, ref in zip(rows, expected):
        ours, theirs = _params(out, row), _params(reference, ref)
        assert ours.keys() == theirs.keys()
        for group in ours:
            assert ours[group].keys() == theirs[group].keys()
            assert all(torch.equal(ours[group][k], theirs[group][k]) for k in ours[group]), (row["rule"], group)


def test_two_workers_give_the_sequential_results_cell_by_cell(suite_file, sequential, tmp_path, monkeypatch):
    def not_here(*args, **kwargs):
        raise AssertionError("with --workers 2 no cell trains in the parent process")

    monkeypatch.setattr(runner, "run_cell", not_here)  # the spawned workers import their own, unpatched
    out = tmp_path / "bench"
    result = benchmark_cli(suite_file, out, "--workers", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    _assert_same_results(out, sequential)
    assert all((out / r["run_dir"] / "row.json").is_file() for r in _rows(out))


def test_a_worker_killed_mid_cell_is_a_failed_row_and_a_rerun_finishes_it(suite_file, sequential, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "bench"
    # the worker training backprop seed 0 SIGKILLs itself right after that cell's epoch 1 checkpoint
    monkeypatch.setenv(runner.KILL_WORKER_FOR_TEST, "backprop-seed0")
    result = benchmark_cli(suite_file, out, "--workers", "2")
    assert result.exit_code == 1, result.output + repr(result.exception)  # a failed cell, not a dead benchmark
    rows = {(r["rule"], r["seed"]): r for r in _rows(out)}
    assert len(rows) == 4  # every cell has its row
    killed = rows["backprop", 0]
    assert killed["status"] == "failed" and "worker process ended abruptly" in killed["error"]
    assert "\n" not in killed["error"]
    assert load_checkpoint(out / killed["run_dir"] / "checkpoint.pt")["epoch"] == 1  # resumable from there
    # the pool stops the other worker too: its cell is finished or failed the same way, never lost
    assert all(r["status"] == "ok" or r["error"] == killed["error"] for r in rows.values())
    assert json.loads((out / killed["run_dir"] / "row.json").read_text())["status"] == "failed"

    monkeypatch.delenv(runner.KILL_WORKER_FOR_TEST)
    again = benchmark_cli(suite_file, out, "--workers", "1")  # (the cells resume from their files, whichever process runs them)
    assert again.exit_code == 0, again.output + repr(again.exception)
    _assert_same_results(out, sequential)


def test_a_cell_that_raises_in_a_worker_is_a_failed_row_beside_cells_that_finish(tmp_path, monkeypatch):
    # a rule registered at run time exists in this process only: a worker process discovers the
    # installed plugins afresh, so there the cell raises (an unknown rule) and fails on its own
    registry = get_registry()
    monkeypatch.setitem(registry.rules, "parent_only", RuleSpec("parent_only", registry.rules["backprop"].make,
                                                                "backprop, known to the parent only"))
    suite = bench.suite_from_dict({"rules": ["backprop", "parent_only", "feedback_alignment"], "seeds": 1,
                                   "measure": {"timing": False},
                                   "settings": {"epochs": 1, "depth": 1, "width": 16, "batch_size": 128,
                                                "device": "cpu"}})
    rows = bench.run_suite(suite, tmp_path / "bench", workers=2)
    assert [(r["rule"], r["status"]) for r in rows] == [("backprop", "ok"), ("parent_only", "failed"),
                                                       ("feedback_alignment", "ok")]
    assert "parent_only" in rows[1]["error"] and "\n" not in rows[1]["error"]


@pytest.mark.parametrize("value", ["0", "abc", "65", "-1", "1.5", ""])
def test_workers_out_of_range_is_one_line_and_exit_2_before_anything_is_written(value, suite_file, tmp_path,
                                                                               monkeypatch, capsys):
    code, err = run_main(["benchmark", str(suite_file), "--out", str(tmp_path / "bench"), "--workers", value, "-q"],
                         tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "--workers must be an integer in 1..64" in err, err
    assert not (tmp_path / "bench").exists()


def test_run_suite_checks_workers_in_the_same_place(tmp_path):
    suite = bench.suite_from_dict({"rules": ["backprop"], "settings": {"epochs": 1}})
    for value in (0, 65, True, 2.0):
        with pytest.raises(UserError, match="--workers must be an integer in 1..64"):
            bench.run_suite(suite, tmp_path / "bench", workers=value)
    assert not (tmp_path / "bench").exists()
    assert runner.check_workers("64") == 64 and runner.check_workers(1) == 1


def test_help_shows_workers():
    result = CliRunner().invoke(app, ["benchmark", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--workers" in result.output
