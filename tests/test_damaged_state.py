"""Damaged or crafted optimiser and rule state in a checkpoint (issue 37, part 1): every entry is
checked against what the configuration builds before a kernel sees it. Before these checks, an
Adam moment one element short crashed `train --resume` inside the fused kernel (SIGSEGV or heap
corruption) and a larger one was accepted; each case here is one line and exit code 2."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fa_rules import runs
from fa_rules.core.checkpoint import CheckpointError
from fa_rules.core.config import TrainConfig
from test_benchmark_hardening import TINY, flaky  # noqa: F401 (a fixture)
from test_hardening_core import assert_one_line, main_in_process

ROOT = Path(__file__).resolve().parents[1]


def train_once(run: Path, **fields) -> None:
    base = dict(epochs=1, batch_size=256, model_options={"width": 8}, device="cpu")
    runs.train(TrainConfig(**{**base, **fields}), run, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished epoch per optimiser setting, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("trained")
    made = {}
    for name, fields in {"adam": {}, "sgd": {"optimizer": "sgd"}, "kp": {"rule": "kolen_pollack"},
                         "fa": {"rule": "feedback_alignment"}}.items():
        train_once(root / name, **fields)
        made[name] = root / name
    return made


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(run: Path, change) -> None:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ckpt)
    buffer = io.BytesIO()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling the deeply nested case recurses once per level
    try:
        torch.save(ckpt, buffer)
    finally:
        sys.setrecursionlimit(limit)
    (run / "checkpoint.pt").write_bytes(buffer.getvalue())


def nested(depth: int):
    value = 1.0
    for _ in range(depth):
        value = [value]
    return value


def _set(path: str, value):
    """A change setting the entry at `path` (keys split by '/'; digits index lists and int keys)."""
    def change(ckpt):
        *parents, last = path.split("/")
        node = ckpt
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        key = int(last) if last.isdigit() else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value(node[key]) if callable(value) else value
    return change


DELETE = object()
ADAM0 = "optimizers/model/state/0"
CASES = {
    # (which run, change, fragments of the one line)
    "exp_avg one short": ("adam", _set(f"{ADAM0}/exp_avg", lambda t: t.flatten()[:-1]), [f"{ADAM0}/exp_avg", "configuration builds"]),
    "exp_avg expanded": ("adam", _set(f"{ADAM0}/exp_avg", lambda t: torch.cat([t.flatten(), t.flatten()])), [f"{ADAM0}/exp_avg"]),
    "exp_avg_sq one short": ("adam", _set(f"{ADAM0}/exp_avg_sq", lambda t: t.flatten()[:-1]), [f"{ADAM0}/exp_avg_sq"]),
    "exp_avg float64": ("adam", _set(f"{ADAM0}/exp_avg", lambda t: t.double()), [f"{ADAM0}/exp_avg", "float64"]),
    "exp_avg NaN": ("adam", _set(f"{ADAM0}/exp_avg", lambda t: torch.full_like(t, float("nan"))), [f"{ADAM0}/exp_avg", "not finite"]),
    "exp_avg_sq negative": ("adam", _set(f"{ADAM0}/exp_avg_sq", lambda t: -t - 1), ["negative second moments"]),
    "vector step": ("adam", _set(f"{ADAM0}/step", lambda t: t.repeat(3)), [f"{ADAM0}/step"]),
    "step beyond the steps taken": ("adam", _set(f"{ADAM0}/step", lambda t: t + 1e6), [f"{ADAM0}/step", "whole number"]),
    "missing state key": ("adam", _set(f"{ADAM0}/exp_avg_sq", DELETE), [ADAM0, "lacks exp_avg_sq"]),
    "state for no parameter": ("adam", _set("optimizers/model/state/99", {}), ["state/99 names no parameter"]),
    "NaN lr": ("adam", _set("optimizers/model/param_groups/0/lr", float("nan")), ["param_groups/0/lr", "finite number >= 0"]),
    "negative lr": ("adam", _set("optimizers/model/param_groups/0/lr", -1.0), ["param_groups/0/lr"]),
    "bad betas": ("adam", _set("optimizers/model/param_groups/0/betas", (0.9, 1.5)), ["param_groups/0/betas is (0.9, 1.5)"]),
    "SGD momentum_buffer short": ("sgd", _set(f"{ADAM0}/momentum_buffer", lambda t: t.flatten()[:-1]), [f"{ADAM0}/momentum_buffer"]),
    "SGD momentum_buffer None": ("sgd", _set(f"{ADAM0}/momentum_buffer", None), [f"{ADAM0}/momentum_buffer is NoneType"]),
    "Kolen-Pollack feedback buffer short": ("kp", _set("optimizers/feedback/state/0/exp_avg", lambda t: t.flatten()[:-1]),
                                            ["optimizers/feedback/state/0/exp_avg"]),
    "rule state of the wrong shape": ("fa", _set("state/feedback/blocks.1.layer.weight", lambda t: t[:-1]),
                                      ["state/feedback/blocks.1.layer.weight", "(7, 8)"]),
    "rule state NaN": ("fa", _set("state/feedback/blocks.1.layer.weight", lambda t: t * float("nan")), ["not finite"]),
    "non-dict history entry": ("adam", _set("history/0", lambda _: [1, 2]), ["history/0", "record of epoch 1"]),
    "deeply nested history": ("adam", _set("history/0/train_loss", lambda _: nested(5000)), ["history/0/train_loss"]),
    "epoch -3": ("adam", _set("epoch", -3), ["epoch is -3"]),
    "vector global_step": ("adam", _set("global_step", lambda _: [1, 2]), ["global_step is list"]),
    "NaN step time": ("adam", _set("step_times/0", float("nan")), ["step_times"]),
    "NaN divergence reference": ("adam", _set("first_step_loss", float("nan")), ["first_step_loss is nan"]),
    "fused as text": ("adam", _set("optimizers/model/param_groups/0/fused", "yes"), ["param_groups/0/fused"]),
    "NaN parameter": ("adam", _set("params/model/blocks.0.layer.weight", lambda t: t * float("nan")), ["not finite"]),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_state_is_one_line_before_any_kernel_runs(case, trained, tmp_path, monkeypatch, capsys):
    which, change, fragments = CASES[case]
    run = copy_run(trained[which], tmp_path / "run")
    rewrite(run, change)
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    code, err = main_in_process(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2", "-q")
    assert code == 2
    assert_one_line(err, "checkpoint.pt", *fragments)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # nothing trained, nothing written


def test_the_crash_case_in_a_fresh_process_is_one_line(trained, tmp_path):
    """The reported crash (SIGSEGV / malloc_consolidate in the fused Adam kernel) as a user meets it."""
    run = copy_run(trained["adam"], tmp_path / "run")
    rewrite(run, CASES["exp_avg one short"][1])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "fa_rules", "train", "--resume", str(run), "--epochs", "3", "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert_one_line(done.stderr, f"{ADAM0}/exp_avg")


def test_an_intact_checkpoint_still_resumes_bit_identically(trained, tmp_path):
    """The checks refuse nothing a run writes: resumed to 2 epochs equals 2 epochs straight."""
    run = copy_run(trained["kp"], tmp_path / "resumed")
    trainer = runs.resume_trainer(run, 2, progress=False)
    trainer.run()
    straight = tmp_path / "straight"
    base = dict(epochs=2, batch_size=256, model_options={"width": 8}, device="cpu", rule="kolen_pollack")
    runs.train(TrainConfig(**base), straight, progress=False)
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    for group in a["params"]:
        for key in a["params"][group]:
            assert torch.equal(a["params"][group][key], b["params"][group][key]), (group, key)
    for group in a["optimizers"]:
        for index, state in a["optimizers"][group]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizers"][group]["state"][index][key])


@pytest.mark.parametrize("kind", ["symlink loop", "dev zero", "fifo", "directory"])
def test_a_checkpoint_that_is_no_regular_file_is_an_error_not_a_fresh_start(kind, trained, tmp_path, monkeypatch,
                                                                            capsys):
    run = copy_run(trained["adam"], tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    ckpt.unlink()
    if kind == "symlink loop":
        os.symlink(ckpt, ckpt)
    elif kind == "dev zero":
        os.symlink("/dev/zero", ckpt)
    elif kind == "fifo":
        os.mkfifo(ckpt)  # reading it would block forever
    else:
        ckpt.mkdir()
    code, err = main_in_process(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2", "-q")
    assert code == 2
    assert_one_line(err, "checkpoint.pt")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1  # not retrained from epoch 0
    with pytest.raises(CheckpointError):
        runs.load_run(run)


def test_a_huge_checkpoint_is_refused_before_it_is_read(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained["adam"], tmp_path / "run")
    with open(run / "checkpoint.pt", "r+b") as f:
        f.truncate(40 * 2**30)  # 40 GB, sparse: reading it would take 40 GB of memory
    code, err = main_in_process(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2", "-q")
    assert code == 2
    assert_one_line(err, "checkpoint.pt", "40,960 MiB", "can be")


def test_a_benchmark_records_a_damaged_cell_as_failed_and_goes_on(tmp_path, flaky):
    from fa_rules import benchmark as bench

    suite = bench.suite_from_dict({"rules": ["flaky", "feedback_alignment"], "settings": {**TINY, "epochs": 2}})
    out = tmp_path / "out"
    rows = bench.run_suite(suite, out)  # flaky fails in epoch 2 and keeps epoch 1's checkpoint
    assert [r["status"] for r in rows] == ["failed", "ok"]
    rewrite(out / "runs" / "flaky-seed0", CASES["exp_avg one short"][1])
    rows = bench.run_suite(suite, out)  # its retry resumes from the damaged checkpoint
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert f"{ADAM0}/exp_avg" in rows[0]["error"] and "\n" not in rows[0]["error"]
