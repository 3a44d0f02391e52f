"""Hardening of the engine's edges (issue 13): checkpoints never run code and are verified before
use, nothing a user started is lost, rule contract violations and divergence are one line, data
files are read safely, and the conformance checks report every failure."""

import gzip
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

from fa_rules import runs
from fa_rules.core.checkpoint import CheckpointError, load_checkpoint
from fa_rules.core.config import TrainConfig
from fa_rules.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**fields) -> TrainConfig:
    base = dict(epochs=1, batch_size=256, model_options={"width": 8}, device="cpu")
    return TrainConfig(**{**base, **fields})


def train_tiny(run_dir: Path, **fields) -> dict:
    return runs.train(tiny_config(**fields), run_dir, progress=False)


def main_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`fa-rules ARGS` through the real entry point (its one-line / exit-code handling), in this process."""
    from fa_rules.cli.app import main

    monkeypatch.setattr(sys, "argv", ["fa-rules", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def assert_one_line(stderr: str, *fragments: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith("error:"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)


# -- 1. checkpoints never run code ----------------------------------------------------------------
class Payload:
    """Unpickling this makes the directory `marker`: proof that a load ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_payload_is_live_under_an_unrestricted_unpickle(tmp_path):
    # the test's own premise: the payload really runs code when unpickled without restriction
    # (torch.save pickles it the same way; plain pickle shows it without an unrestricted torch.load)
    pickle.loads(pickle.dumps({"params": Payload(tmp_path / "ran")}))
    assert (tmp_path / "ran").is_dir()


def test_a_malicious_checkpoint_never_runs_in_any_command(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    marker = tmp_path / "pwned"
    torch.save({"params": Payload(marker), "state": {}, "epoch": 1}, run / "checkpoint.pt")
    commands = [("train", "--resume", run, "-q"), ("probe", run), ("reconstruct", run, "--out", tmp_path / "r.png"),
                ("sample", run, "--out", tmp_path / "s.png"), ("fid", run, "--num", "10")]
    for command in commands:  # in this process: five fresh interpreters cost 47 s of imports on 2 cores
        code, err = main_in_process(monkeypatch, capsys, *command)
        assert not marker.exists(), command
        assert code == 2, (command, err)
        assert_one_line(err, str(run / "checkpoint.pt"), "refused", "GLOBAL")


def test_a_bare_pickle_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"params": Payload(marker)}))
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint") as e:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists() and "\n" not in str(e.value)


# -- 4. nothing lost ------------------------------------------------------------------------------
def test_flipped_bytes_in_a_checkpoint_are_refused(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train_tiny(run)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    assert len(data) > 4000
    for i in range(len(data) // 2, len(data) // 2 + 64):  # 64 flipped bytes, as in the issue
        data[i] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(data))
    code, err = main_in_process(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2", "-q")
    assert code == 2
    assert_one_line(err, "checkpoint.pt", "damaged")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1  # nothing trained on it


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_empty_garbage_or_foreign_checkpoints_are_one_line(tmp_path, monkeypatch, capsys, content):
    run = tmp_path / "run"
    train_tiny(run)
    if content is None:
        torch.save({}, run / "checkpoint.pt")  # a valid file, but not a checkpoint
    else:
        (run / "checkpoint.pt").write_bytes(content)
    code, err = main_in_process(monkeypatch, capsys, "train", "--resume", run, "-q")
    assert code == 2
    assert_one_line(err, "checkpoint.pt")
    assert "Aborted" not in err


def test_a_checkpoint_that_does_not_match_the_config_is_refused(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train_tiny(run)
    config = json.loads((run / "config.json").read_text())
    config["model_options"]["width"] = 16  # config.json edited after training
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model/.* is \(8, 64\) torch.float32 there, the configuration builds \(16, 64\)"):
        runs.resume_trainer(run, progress=False)
    with pytest.raises(CheckpointError, match="does not match the run's configuration"):
        runs.load_run(run)
    summary_before = (run / "summary.json").read_text()
    code, err = main_in_process(monkeypatch, capsys, "probe", run)
    assert code == 2
    assert_one_line(err, "does not match")
    assert (run / "summary.json").read_text() == summary_before  # no numbers written for it


def _failing_checkpoint_fsync(monkeypatch, fail_on: int):
    """os.fsync raising disk full on the `fail_on`-th checkpoint write (1-based)."""
    real, calls = os.fsync, []

    def fsync(fd):
        if ".checkpoint.pt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == fail_on:
                raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_disk_full_keeps_the_last_checkpoint_leaves_no_debris_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _failing_checkpoint_fsync(monkeypatch, fail_on=2)
    code, err = main_in_process(monkeypatch, capsys, "train", "--epochs", "2", "--width", "8", "--batch-size", "256",
                                "--device", "cpu", "--out", run, "-q")
    assert code == 2
    assert_one_line(err, "No space left on device", "checkpoint of epoch 1 is kept", f"--resume {run}")
    assert not list(run.glob(".*.tmp-*"))  # the half-written temporary file is gone
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    monkeypatch.undo()
    trainer = runs.resume_trainer(run, progress=False)
    trainer.run()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    run = tmp_path / "run"
    train_tiny(run)
    stale = [run / ".checkpoint.pt.tmp-999999", run / ".metrics.jsonl.tmp-999998"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    trainer = runs.resume_trainer(run, epochs=2, progress=False)
    assert not any(p.exists() for p in stale)
    trainer.run()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2


def test_a_metrics_line_lost_after_the_checkpoint_write_is_restored_on_resume(tmp_path):
    run = tmp_path / "run"
    train_tiny(run, epochs=2)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # the process died after the last checkpoint replace, before metrics.jsonl held epoch 2
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    runs.resume_trainer(run, progress=False).run()  # nothing left to train: it only restores
    assert (run / "metrics.jsonl").read_text().splitlines() == lines


# -- 2. CIFAR-10 batches through a restricted unpickler -------------------------------------------
def _cifar_set(tmp_path: Path) -> tuple[Path, dict]:
    from fa_rules.plugins import datasets as ds

    folder = tmp_path / ds.CIFAR_DIR
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    batches = {}
    for i, name in enumerate((*ds.CIFAR_TRAIN, "test_batch")):
        data = torch.randint(0, 256, (3, 3072), generator=g).to(torch.uint8).numpy()
        batches[name] = {b"batch_label": b"batch %d" % i, b"data": data, b"labels": [i % 10, 3, 9],
                         b"filenames": [b"a.png", b"b.png", b"c.png"]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    return folder, batches


def test_cifar10_batches_load_through_the_restricted_unpickler(tmp_path):
    from fa_rules.plugins import datasets as ds

    _, batches = _cifar_set(tmp_path)
    d = ds.load_cifar10(str(tmp_path))
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.train_y.tolist()[:6] == [0, 3, 9, 1, 3, 9]
    assert torch.equal(d.test_x.reshape(3, -1), torch.from_numpy(batches["test_batch"][b"data"]))


def test_a_malicious_cifar10_batch_never_runs(tmp_path, monkeypatch, capsys):
    import numpy as np

    from fa_rules.plugins import datasets as ds

    folder, _ = _cifar_set(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [1]}))
    with pytest.raises(UserError, match=r"data_batch_1 refused: not a CIFAR-10 batch \(it holds global (posix|os)\.mkdir\)"):
        ds.load_cifar10(str(tmp_path))
    assert not marker.exists()
    code, err = main_in_process(monkeypatch, capsys, "train", "--dataset", "cifar10", "--data-dir", tmp_path,
                                "--epochs", "1", "--out", tmp_path / "run", "-q")
    assert code == 2 and not marker.exists()
    assert_one_line(err, str(folder / "data_batch_1"), "refused")
    # an object array (whose items could be anything) is refused too, as is a truncated file
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": []}))
    with pytest.raises(UserError, match="dtype object, not uint8"):
        ds.load_cifar10(str(tmp_path))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": 1})[:-3])
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR-10 batch file"):
        ds.load_cifar10(str(tmp_path))


# -- 3. IDX files ---------------------------------------------------------------------------------
def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def write_idx_set(folder: Path, n_train=20, n_test=10, labels=None, size=28) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, size, size), generator=g),
        "train-labels-idx1-ubyte": torch.arange(n_train) % 10 if labels is None else labels,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g),
        "t10k-labels-idx1-ubyte": torch.arange(n_test) % 10,
    }
    for name, a in arrays.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(a)))
    return folder


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_promises(tmp_path):
    import tracemalloc

    from fa_rules.plugins.datasets import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 10, 28, 28)  # promises 7840 bytes
    with gzip.GzipFile(path, "wb", compresslevel=1) as f:  # then 256 MiB of zeros (about 1 MB on disk)
        f.write(header)
        zeros = bytes(1 << 20)
        for _ in range(256):
            f.write(zeros)
    assert path.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="holds more data than the 7840 bytes its header promises") as e:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # reading the whole stream took 256 MiB and more
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case, message", [
    ("not_gzip", "train-images-idx3-ubyte.gz is not a gzip file"),
    ("truncated_gz", "train-images-idx3-ubyte.gz is truncated"),
    ("labels_out_of_range", "train-labels-idx1-ubyte.gz holds label 12, outside the classes 0..9"),
    ("count_mismatch", "holds 20 images but .*train-labels-idx1-ubyte.gz holds 19 labels"),
    ("wrong_shape", r"train-images-idx3-ubyte.gz holds items of shape \(32, 32\), expected 28x28"),
])
def test_broken_idx_files_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys, case, message):
    from fa_rules.plugins import datasets as ds

    folder = tmp_path / "MNIST" / "raw"
    labels = {"labels_out_of_range": torch.arange(20) % 13, "count_mismatch": torch.arange(19) % 10}.get(case)
    write_idx_set(folder, labels=labels, size=32 if case == "wrong_shape" else 28)
    images = folder / "train-images-idx3-ubyte.gz"
    if case == "not_gzip":
        images.write_bytes(gzip.decompress(images.read_bytes()))
    elif case == "truncated_gz":
        images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(UserError, match=message) as e:
        ds.load_mnist(str(tmp_path))
    assert "\n" not in str(e.value)
    if case == "truncated_gz":  # click used to turn the escaping EOFError into a bare "Aborted."
        code, err = main_in_process(monkeypatch, capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path,
                                    "--epochs", "1", "--out", tmp_path / "run", "-q")
        assert code == 2 and "Aborted" not in err
        assert_one_line(err, str(images), "truncated")


@pytest.mark.needs_package("Debian's Fashion-MNIST", "apt-get install dataset-fashion-mnist",
                           path="/usr/share/datasets/fashion-mnist")
def test_an_explicit_data_dir_without_the_files_says_which_files_are_used(tmp_path, capsys):
    from fa_rules.plugins import datasets as ds

    write_idx_set(tmp_path / "fashion_mnist").joinpath("t10k-labels-idx1-ubyte.gz").unlink()  # incomplete
    d = ds.load_fashion_mnist(str(tmp_path))
    assert d.train_x.shape[0] == 60000  # the system copy, not the 20 images here
    err = capsys.readouterr().err
    assert err == (f"note: fashion_mnist: no complete IDX files in {tmp_path}; "
                   f"using those in {ds.DEBIAN_FASHION_MNIST}\n")


# -- 5. divergence and the rule contract at the first step ----------------------------------------
def _zeros(params):
    return {g: {k: torch.zeros_like(v) for k, v in t.items()} for g, t in params.items()}


def _trainer(tmp_path, step, init=None, name="custom", epochs=1, **config_fields):
    from fa_rules import models as zoo
    from fa_rules.core.rule import Rule, no_state_init
    from fa_rules.core.trainer import Trainer
    from fa_rules.plugins.datasets import load_digits

    config = tiny_config(rule=name, epochs=epochs, **config_fields)
    rule = Rule(init=init or no_state_init, step=step)
    return Trainer(config, rule, lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tmp_path, progress=False)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_loss_growing_past_the_divergence_factor_is_recorded_and_keeps_the_last_checkpoint(tmp_path, sign):
    from fa_rules.core.trainer import Diverged

    def step(network, params, state, batch):  # loss 2**n at the n-th step: finite, but exploding
        return _zeros(params), {"n": state["n"] + 1}, {"loss": sign * 2.0 ** state["n"]}

    def init(network, params, generator):
        return params, {"n": 0}

    # 1437 digits / 256 = 6 steps per epoch: epoch 1's mean is 10.5; epoch 2's step 5 has loss 1024,
    # past 1000 times the first step's (the epoch-mean check: tests/test_divergence_within_epoch.py)
    trainer = _trainer(tmp_path, step, init, name="exploding", epochs=5)
    with pytest.raises(Diverged) as e:
        trainer.run()
    assert str(e.value) == (f"rule 'exploding' diverged at epoch 2, step 5: training loss {sign * 1024:.4g} exceeds "
                            f"1000 times the first step's ({sign:g}); the checkpoint of epoch 1 is kept")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["diverged_epoch"], summary["epochs"]) == ("diverged", 2, 1)
    assert summary["train_loss"] == sign * 10.5 and summary["error"] == str(e.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    # the factor is a setting (--divergence-factor): 0 (or a large factor) lets the same run finish
    assert _trainer(tmp_path / "off", step, init, epochs=5, divergence_factor=0).run()["status"] == "ok"
    assert _trainer(tmp_path / "big", step, init, epochs=5, divergence_factor=1e9).run()["status"] == "ok"


def test_a_zero_first_epoch_loss_gives_no_divergence_reference(tmp_path):
    def step(network, params, state, batch):
        return _zeros(params), {"n": state["n"] + 1}, {"loss": 0.0 if state["n"] < 6 else 1e6}

    trainer = _trainer(tmp_path, step, lambda n, p, g: (p, {"n": 0}), epochs=2)
    assert trainer.run()["train_loss"] == 1e6


def test_nan_updates_are_refused_before_they_are_applied(tmp_path):
    from fa_rules.core.trainer import Diverged

    def step(network, params, state, batch):
        updates = _zeros(params)
        updates["model"]["blocks.1.layer.bias"][3] = float("nan")
        return updates, state, {"loss": 1.0}

    trainer = _trainer(tmp_path, step, name="nan_rule")
    before = {k: v.clone() for k, v in trainer.params["model"].items()}
    assert "blocks.1.layer.bias" in before
    with pytest.raises(Diverged) as e:
        trainer.run()
    assert str(e.value) == ("rule 'nan_rule' returned a non-finite update for model/blocks.1.layer.bias at epoch 1, "
                            "step 1 (not applied)")
    assert all(torch.equal(before[k], v) for k, v in trainer.params["model"].items())  # Adam never saw it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["diverged_epoch"], summary["epochs"]) == ("diverged", 1, 0)


def _missing_key(params):
    u = _zeros(params)
    del u["model"]["blocks.0.layer.weight"]
    return u


def _extra_key(params):
    u = _zeros(params)
    u["model"]["nosuch"] = torch.zeros(1)
    return u


def _wrong_shape(params):
    u = _zeros(params)
    u["model"]["blocks.0.layer.weight"] = torch.zeros(3, 3)
    return u


def _unknown_group(params):
    return {**_zeros(params), "feedback": {}}


@pytest.mark.parametrize("make, message", [
    (_missing_key, "rule 'broken': updates of group 'model' lack key(s) blocks.0.layer.weight"),
    (_extra_key, "rule 'broken': updates of group 'model' have unknown key(s) nosuch"),
    (_wrong_shape, "rule 'broken': update model/blocks.0.layer.weight is (3, 3) torch.float32 on cpu, parameter is "
                   "(8, 64) torch.float32 on cpu"),
    (_unknown_group, "rule 'broken' returned updates for unknown group 'feedback' (its groups: model)"),
])
def test_malformed_updates_name_the_rule_group_and_key(tmp_path, make, message):
    from fa_rules.core.errors import RuleError

    trainer = _trainer(tmp_path, lambda network, params, state, batch: (make(params), state, {"loss": 1.0}),
                       name="broken")
    with pytest.raises(RuleError) as e:
        trainer.run()
    assert str(e.value) == message


def test_a_rule_without_a_loss_metric_fails_at_the_first_step(tmp_path):
    from fa_rules.core.errors import RuleError

    steps = []

    def step(network, params, state, batch):
        steps.append(1)
        return _zeros(params), state, {"accuracy": 0.5}

    with pytest.raises(RuleError, match=r"^rule 'lossless' returned no scalar 'loss' metric \(the contract requires "
                                        r"one; metrics: accuracy\)$"):
        _trainer(tmp_path, step, name="lossless").run()
    assert len(steps) == 2  # the memory probe's throw-away step, then the first training step


def test_rule_state_that_a_checkpoint_cannot_hold_fails_at_the_first_step(tmp_path):
    import numpy as np

    from fa_rules.core.errors import RuleError

    def init(network, params, generator):
        return params, {"scale": np.float64(1.0), "w": [torch.zeros(2)]}

    step = lambda network, params, state, batch: (_zeros(params), state, {"loss": 1.0})  # noqa: E731
    with pytest.raises(RuleError, match=r"rule 'numpy_state': state\['scale'\] is a numpy.float64; rule state may "
                                        r"hold only tensors and plain Python values"):
        _trainer(tmp_path, step, init, name="numpy_state").run()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_rule_contract_error_is_one_line_with_exit_code_2_through_the_cli(tmp_path, monkeypatch, capsys):
    from fa_rules.core.rule import Rule, RuleSpec, no_state_init
    from fa_rules.plugins import manager

    def build():
        return Rule(init=no_state_init, step=lambda network, params, state, batch: (_wrong_shape(params), state,
                                                                                     {"loss": 1.0}))

    registry = manager.build_registry(autoload=False)
    registry.rules["broken"] = RuleSpec("broken", build, "returns a wrongly shaped update")
    monkeypatch.setattr(manager, "get_registry", lambda: registry)
    monkeypatch.setattr(runs, "get_registry", lambda: registry)
    code, err = main_in_process(monkeypatch, capsys, "train", "--rule", "broken", "--epochs", "1", "--width", "8",
                                "--device", "cpu", "--out", tmp_path / "run", "-q")
    assert code == 2
    assert_one_line(err, "rule 'broken': update model/blocks.0.layer.weight is (3, 3)")


# -- 6. fa_rules.testing reports every failure ----------------------------------------------------
def _spec(name, step, models=None):
    from fa_rules.core.rule import Rule, RuleSpec, no_state_init

    return RuleSpec(name, lambda: Rule(init=no_state_init, step=step), "a test rule", models=models)


def test_conformance_runs_every_check_and_lists_each_failure_by_name():
    from fa_rules.testing import assert_conformant

    def step(network, params, state, batch):
        raise ValueError("no such thing")

    with pytest.raises(AssertionError) as e:  # not the ValueError
        assert_conformant(_spec("raises", step, models=("mlp",)))
    message = str(e.value)
    for check in ("structure", "finite", "state_types", "determinism", "no_mutation", "roundtrip", "learns"):
        assert f"{check} [mlp]: ValueError: no such thing" in message
    assert "lenet" not in message  # the rule does not support it


def test_nan_updates_are_a_finite_failure_not_determinism_or_roundtrip():
    from fa_rules.core.rule import Rule, RuleSpec
    from fa_rules.testing import assert_conformant

    def init(network, params, generator):
        return params, {"w": torch.randn(3, generator=generator)}

    def step(network, params, state, batch):
        updates = _zeros(params)
        first = next(iter(updates["model"]))
        updates["model"][first] = torch.full_like(updates["model"][first], float("nan"))
        return updates, {"w": state["w"] * float("nan")}, {"loss": torch.tensor(1.0)}

    spec = RuleSpec("nan_rule", lambda: Rule(init=init, step=step), "NaN updates", models=("mlp",))
    with pytest.raises(AssertionError) as e:
        assert_conformant(spec)
    failed = {part.split(":")[0].strip() for part in str(e.value).split(": ", 1)[1].split("; ")}
    assert "finite [mlp]" in failed and "determinism [mlp]" not in failed and "roundtrip [mlp]" not in failed
    assert "update model/blocks.0.layer.weight holds NaN or inf" in str(e.value)


def test_conformance_also_checks_a_conv_model_when_the_rule_supports_one():
    from fa_rules.testing import assert_conformant, models_to_check

    def step(network, params, state, batch):  # right on an MLP, a missing key on a conv model
        updates = _zeros(params)
        if batch.x.dim() == 4 and network.family == "lenet":
            updates["model"].pop(next(iter(updates["model"])))
        return updates, state, {"loss": torch.tensor(1.0)}

    assert models_to_check(_spec("a", step)) == ["mlp", "lenet"]
    assert models_to_check(_spec("b", step, models=("mlp", "paper_encoder"))) == ["mlp"]
    with pytest.raises(AssertionError) as e:
        assert_conformant(_spec("conv_broken", step))
    message = str(e.value)
    assert "structure [lenet]: RuleError: rule 'conv_broken': updates of group 'model' lack key(s)" in message
    assert "structure [mlp]" not in message
