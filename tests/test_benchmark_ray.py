"""`fa-rules benchmark --cluster ray`: cells train as Ray tasks on a local Ray cluster (2 CPUs, one
for the whole file) with the results of the sequential run, a Ray worker killed mid-cell is retried
by Ray and resumes from the cell's epoch-1 checkpoint, and the flag is checked before anything is
written. Tiny MLPs on digits, one torch thread (as the reports use)."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from test_benchmark_workers import SUITE as WORKERS_SUITE
from test_benchmark_workers import _rows, _untimed, benchmark_cli, one_thread  # noqa: F401  (one_thread: autouse)
from test_cli_errors import run_main
from typer.testing import CliRunner

from fa_rules import benchmark as bench
from fa_rules.benchmark import cluster, runner
from fa_rules.cli.app import app
from fa_rules.core import UserError
from fa_rules.core.checkpoint import load_checkpoint

needs_ray = pytest.mark.needs_package("Ray", 'pip install -e ".[ray]"', module="ray")

# the workers' suite with one seed: two cells
SUITE = WORKERS_SUITE.replace('name = "workers"', 'name = "ray"').replace("seeds = 2", "seeds = 1")
KILLED = "feedback_alignment-seed0"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs shared by the tests of this file: `--cluster ray` finds this
    process initialised and uses that connection (starting Ray costs seconds)."""
    import ray

    # "local": a new instance even where RAY_ADDRESS or a `ray start` cluster on this machine exists
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "ray.toml"
    path.write_text(SUITE)
    return path


@needs_ray
def test_cells_on_a_ray_cluster_with_a_killed_worker_give_the_sequential_results(
        ray_cluster, suite_file, tmp_path, monkeypatch):
    reference = tmp_path / "sequential"
    result = benchmark_cli(suite_file, reference)
    assert result.exit_code == 0, result.output + repr(result.exception)

    events = []
    monkeypatch.setattr(bench.LiveTable, "__call__", lambda self, kind, i, payload: events.append(
        (kind, self.cells[i].dirname, payload.get("epoch"))))

    def not_here(*args, **kwargs):
        raise AssertionError("with --cluster no cell trains in the benchmark process")

    monkeypatch.setattr(runner, "run_cell", not_here)  # the Ray workers import their own, unpatched
    # the Ray worker training this cell SIGKILLs itself right after the cell's epoch 1 checkpoint
    monkeypatch.setenv(runner.KILL_WORKER_FOR_TEST, KILLED)
    out = tmp_path / "bench"
    result = benchmark_cli(suite_file, out, "--cluster", "ray")
    assert result.exit_code == 0, result.output + repr(result.exception)

    rows, expected = _rows(out), _rows(reference)
    assert [r["rule"] for r in rows] == ["backprop", "feedback_alignment"]  # planned order
    assert all(r["status"] == "ok" and r["epochs"] == 2 for r in rows)
    assert [_untimed(r) for r in rows] == [_untimed(r) for r in expected]  # test accuracy, loss, angles, ...
    assert rows[0]["test_accuracy"] > 0.2  # two epochs of backprop on digits: above chance (real numbers compared)
    for row, ref in zip(rows, expected):
        ours = load_checkpoint(out / row["run_dir"] / "checkpoint.pt")
        theirs = load_checkpoint(reference / ref["run_dir"] / "checkpoint.pt")
        assert ours["epoch"] == theirs["epoch"] == 2
        for group in theirs["params"]:
            assert all(torch.equal(ours["params"][group][k], theirs["params"][group][k])
                       for k in theirs["params"][group]), (row["rule"], group)
        assert (out / row["run_dir"] / "row.json").is_file()

    # the killed attempt started and died before reporting epoch 1; Ray's retry started again and,
    # resuming from the epoch 1 checkpoint, trained epoch 2 only
    def seen(dirname):
        return [(kind, epoch) for kind, name, epoch in events if name == dirname]

    assert seen(KILLED) == [("start", None), ("start", None), ("epoch", 2), ("done", None)], events
    assert seen("backprop-seed0") == [("start", None), ("epoch", 1), ("epoch", 2), ("done", None)], events
    metrics = (out / rows[1]["run_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]  # epoch 1 not trained twice


@needs_ray
def test_run_remote_returns_results_by_index_and_a_raising_task_as_its_error(ray_cluster):
    results, errors, polls = {}, {}, []

    def on_result(index, result, error):
        results[index], errors[index] = result, error

    # a module-level function Ray imports by name: the CLI's own check of --workers
    cluster.run_remote(runner.check_workers, [("3",), ("0",), ("64",)], {"num_cpus": 1}, "ray", on_result,
                       poll=lambda: polls.append(1))
    assert results == {0: 3, 1: None, 2: 64}
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], UserError) and "--workers must be an integer in 1..64" in str(errors[1])
    assert polls and ray_cluster.is_initialized()  # a connection it did not make is left open


@pytest.mark.parametrize("value, message", [
    ("bogus", "--cluster must be ray, auto (the cluster at RAY_ADDRESS) or ray://HOST:PORT, got 'bogus'"),
    ("ray://head", "--cluster must be ray, auto"),
    ("ray://head:70000", "the port must be in 1..65535"),
    ("auto", "--cluster auto needs RAY_ADDRESS"),
])
def test_a_wrong_cluster_is_one_line_and_exit_2_before_anything_is_written(value, message, suite_file, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = run_main(["benchmark", str(suite_file), "--out", str(tmp_path / "bench"), "--cluster", value, "-q"],
                         tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err, err
    assert not (tmp_path / "bench").exists()


def test_workers_beside_a_cluster_and_a_missing_ray_are_one_line(suite_file, tmp_path, monkeypatch, capsys):
    args = ["benchmark", str(suite_file), "--out", str(tmp_path / "bench"), "-q", "--cluster", "ray"]
    code, err = run_main([*args, "--workers", "2"], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--workers 2 and --cluster ray do not combine" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, err = run_main(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert 'pip install -e ".[ray]"' in err and 'pip install "fa-rules[ray]"' in err
    assert not (tmp_path / "bench").exists()
    with pytest.raises(UserError, match="needs Ray"):  # run_suite checks in the same place
        bench.run_suite(bench.suite_from_dict({"rules": ["backprop"]}), tmp_path / "bench", cluster="ray")
    assert not (tmp_path / "bench").exists()


def test_check_cluster_accepts_the_documented_forms(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.check_cluster(None) is None and cluster.check_cluster("  ") is None
    found = cluster.importlib.util.find_spec
    if found("ray") is not None:
        assert cluster.check_cluster("ray") == "ray" and cluster.check_cluster(" auto ") == "auto"
        if found("grpc") is not None:  # the Ray client's transport
            assert cluster.check_cluster("ray://head.example:10001") == "ray://head.example:10001"


def test_help_shows_cluster():
    result = CliRunner().invoke(app, ["benchmark", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--cluster" in result.output and "ray://HOST:PORT" in result.output
