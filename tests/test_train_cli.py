import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Rule, RuleSpec, UserError, no_state_init
from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.core.trainer import Diverged, TrainConfig, Trainer
from fa_rules import runs as experiment
from fa_rules.plugins import manager
from fa_rules.plugins.datasets import load_digits
from fa_rules import models as zoo
from test_cli_errors import run_main

SMALL = ["--width", "32", "--batch-size", "128", "-q"]


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_default_training_on_digits_reaches_95_percent_and_writes_the_run(tmp_path, run_pictures):
    out = tmp_path / "run"
    invoke("train", "--rule", "backprop", "--dataset", "digits", "--out", str(out), "-q")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95
    for key in ("test_loss", "rule", "dataset", "model", "seed", "epochs", "params", "step_time_s", "peak_saved_bytes"):
        assert key in summary, key
    assert summary["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert summary["peak_saved_bytes"] > 64 * 256 * 4  # at least one hidden activation of the batch
    assert len(summary["alignment_angle_deg"]) == 3 and max(summary["alignment_angle_deg"]) < 0.01  # backprop
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    assert rows[-1]["test_accuracy"] == summary["test_accuracy"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((out / "config.json").read_text())["rule"] == "backprop"
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").stat().st_size > 1000
    assert (out / "alignment.png").stat().st_size > 1000


def test_alignment_angle_of_a_rule_that_ignores_hidden_blocks_is_90_degrees(tmp_path):
    out = tmp_path / "run"
    invoke("train", "--rule", "readout_only", "--epochs", "1", "--out", str(out), *SMALL)
    angles = json.loads((out / "summary.json").read_text())["alignment_angle_deg"]
    assert angles[0] == angles[1] == 90.0 and angles[2] < 1e-3


def _final(run):
    ckpt = load_checkpoint(run / "checkpoint.pt")
    history = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in ckpt["history"]]
    return ckpt["params"], history


def _assert_identical(run_a, run_b):
    pa, ha = _final(run_a)
    pb, hb = _final(run_b)
    assert ha == hb
    for group in pa:
        for key in pa[group]:
            assert torch.equal(pa[group][key], pb[group][key]), key


def test_resume_continues_to_exactly_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    invoke("train", "--epochs", "3", "--out", str(a), "--optimizer", "sgd", *SMALL)
    invoke("train", "--epochs", "1", "--out", str(b), "--optimizer", "sgd", *SMALL)
    invoke("train", "--resume", str(b), "--epochs", "3", "-q")
    _assert_identical(a, b)
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_after_kill_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    invoke("train", "--epochs", "8", "--out", str(a), *SMALL)
    proc = subprocess.Popen([sys.executable, "-m", "fa_rules", "train", "--epochs", "8", "--out", str(b), *SMALL],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = b / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(b / "checkpoint.pt")["epoch"] < 8  # killed mid-run, checkpoint readable
    invoke("train", "--resume", str(b), "--epochs", "8", "-q")
    _assert_identical(a, b)


def test_user_mistakes_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from fa_rules.cli.app import main

    cases = [
        (["train", "--rule", "bakprop"], "did you mean: backprop"),
        (["train", "--dataset", "fashion-mnist"], "did you mean: fashion_mnist"),
        (["train", "--model", "lenet", "--depth", "3"], "no setting --depth"),
        (["train", "--resume", str(tmp_path / "missing")], "does not exist"),
        (["train", "--opt", "nonsense=1"], "has no option nonsense"),
        (["train", "--lr-schedule", "linear", "--epochs", "1"], "--lr-schedule must be constant or cosine"),
        (["train", "--eval-every", "0", "--epochs", "1"], "--eval-every must be an integer in 1..1000000, got 0"),
        (["train", "--group-lr", "feedback=0.1", "--epochs", "1"], "--group-lr names group"),
        (["train", "--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "device"),
    ]
    monkeypatch.chdir(tmp_path)
    for args, expected in cases:  # through the entry point the `fa-rules` script calls
        monkeypatch.setattr(sys, "argv", ["fa-rules", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, stderr)
        assert "Traceback" not in stderr
        assert not any(tmp_path.iterdir()), (args, "left a run directory")


def test_existing_run_is_never_overwritten(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    invoke("train", "--epochs", "1", "--out", str(out), *SMALL)
    before = (out / "checkpoint.pt").read_bytes()
    code, stderr = run_main(["train", "--epochs", "1", "--out", str(out), *SMALL], tmp_path, monkeypatch, capsys)
    assert code == 2 and "--resume" in stderr and "\n" not in stderr.strip()
    assert (out / "checkpoint.pt").read_bytes() == before


def test_rule_that_does_not_support_the_model_is_a_clear_error():
    registry = manager.build_registry(autoload=False)
    registry.rules["mlp_only"] = RuleSpec("mlp_only", registry.rules["backprop"].build, "test", models=("mlp",))
    with pytest.raises(UserError, match="does not support model 'lenet'"):
        experiment.resolve(TrainConfig(rule="mlp_only", model="lenet"), registry)


def test_classify_rule_on_unlabelled_dataset_is_a_clear_error():
    data = load_digits()
    data.num_classes = 0
    with pytest.raises(UserError, match="no class labels"):
        Trainer(TrainConfig(), registry_rule(), lambda: zoo.mlp((1, 8, 8), (10,)), data, "unused", progress=False)


def registry_rule():
    return manager.build_registry(autoload=False).rule("backprop").make()


def test_divergence_is_reported(tmp_path):
    def step(network, params, state, batch):  # finite updates, a NaN loss (NaN updates: test_hardening_core)
        zeros = {k: torch.zeros_like(v) for k, v in params["model"].items()}
        return {"model": zeros}, state, {"loss": torch.tensor(float("nan"))}

    trainer = Trainer(TrainConfig(epochs=1), Rule(init=no_state_init, step=step),
                      lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tmp_path, progress=False)
    with pytest.raises(Diverged, match="diverged at epoch 1, step 1"):
        trainer.run()


def test_cosine_schedule_ends_near_zero_and_resumes_after_an_interruption_bit_identically(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("train", "--epochs", "3", "--lr-schedule", "cosine", "--lr", "0.01", *SMALL)
    invoke(*args, "--out", str(a))
    ckpt = load_checkpoint(a / "checkpoint.pt")
    total = ckpt["global_step"]
    lr = ckpt["optimizers"]["model"]["param_groups"][0]["lr"]  # the rate of the last step
    assert lr == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)), rel=1e-9)
    assert lr < 0.01 * 0.01

    evaluate, calls = Trainer.evaluate, []

    def interrupted_evaluate(self):  # the process dies during the second epoch's evaluation
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        config = TrainConfig(epochs=3, lr_schedule="cosine", lr=0.01, batch_size=128, model_options={"width": 32})
        experiment.new_trainer(config, b, progress=False).run()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert load_checkpoint(b / "checkpoint.pt")["epoch"] == 1
    invoke("train", "--resume", str(b), "-q")
    _assert_identical(a, b)


def test_eval_every_skips_test_evaluations_without_changing_what_is_trained(tmp_path, run_pictures):
    # vae: its evaluation runs the rule's reconstruction (random, from its own generator), so a
    # skipped evaluation that touched the training's randomness would show in the parameters
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("train", "--rule", "vae", "--dataset", "digits", "--latent-dim", "8", "--epochs", "4", *SMALL)
    invoke(*common, "--out", str(a))
    invoke(*common, "--out", str(b), "--eval-every", "3")
    pa, ha = _final(a)
    pb, hb = _final(b)
    for group in pa:
        for key in pa[group]:
            assert torch.equal(pa[group][key], pb[group][key]), key
    assert [("test_recon_mse" in r) for r in hb] == [False, False, True, True]  # epoch 3, and the last
    assert hb[3]["test_recon_mse"] == ha[3]["test_recon_mse"]
    assert [r["train_loss"] for r in ha] == [r["train_loss"] for r in hb]
    summary = json.loads((b / "summary.json").read_text())
    assert summary["test_recon_mse"] == hb[3]["test_recon_mse"]
    assert (b / "curves.png").stat().st_size > 1000
