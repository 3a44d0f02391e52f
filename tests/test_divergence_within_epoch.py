"""Divergence inside an epoch (issue 37, section 5): every loss is measured against the run's first
step's, so a huge learning rate stops the run in its first epoch instead of ending `status: ok` with
a loss of 10^5; the reference is saved with the checkpoint, normal runs of every kind of rule are not
flagged, and every message names a step the same way (its epoch and its place in it, from 1)."""

import json
import re

import pytest
import torch
from test_cli_errors import run_main

from fa_rules import benchmark as bench
from fa_rules import models as zoo
from fa_rules import runs
from fa_rules.core import Rule, RuleSpec
from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import LOG_EVERY, Diverged, Trainer
from fa_rules.plugins.datasets import load_digits
from fa_rules.plugins.manager import get_registry

TINY = ["--dataset", "digits", "--depth", "1", "--width", "16", "--batch-size", "128", "--epochs", "1", "-q"]
STEPS_PER_EPOCH = 6  # 1437 digits in batches of 256


def _zeros(params):
    return {g: {k: torch.zeros_like(v) for k, v in t.items()} for g, t in params.items()}


def _counting_rule(loss_at) -> Rule:
    """Zero updates; the loss of the n-th training step (from 0) is `loss_at(n)`."""

    def init(network, params, generator):
        return params, {"n": 0}

    def step(network, params, state, batch):
        return _zeros(params), {"n": state["n"] + 1}, {"loss": float(loss_at(state["n"]))}

    return Rule(init=init, step=step)


def _trainer(out, rule, epochs, **fields) -> Trainer:
    config = TrainConfig(rule=fields.pop("name", "spiky"), epochs=epochs, batch_size=256, device="cpu", **fields)
    return Trainer(config, rule, lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), out, progress=False)


# -- a huge learning rate, through the command line ------------------------------------------------
@pytest.mark.parametrize("optimizer, lr", [("adam", "1e4"), ("sgd", "1e2")])
def test_a_huge_learning_rate_stops_as_diverged_in_the_first_epoch(optimizer, lr, tmp_path, monkeypatch, capsys):
    # before: both ended `status: ok` after one epoch with a mean training loss of 10^3 to 10^5
    args = ["train", "--rule", "backprop", *TINY, "--optimizer", optimizer, "--lr", lr]
    code, err = run_main([*args, "--out", "run"], tmp_path, monkeypatch, capsys)
    assert code == 1  # divergence's exit status (a user mistake is 2)
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    # the untrained classifier's loss is near ln 10 = 2.3; the run stops in its first logging interval
    found = re.fullmatch(r"error: rule 'backprop' diverged at epoch 1, step (\d+): training loss (\S+) "
                         r"exceeds 1000 times the first step's \((2\.\d+)\)", lines[0])
    assert found, lines[0]
    assert int(found[1]) <= LOG_EVERY and float(found[2]) > 1000 * float(found[3])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["diverged_epoch"], summary["epochs"]) == ("diverged", 1, 0)
    assert summary["error"] == lines[0].removeprefix("error: ")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # --divergence-factor 0 turns the check off: the same run finishes
    code, err = run_main([*args, "--divergence-factor", "0", "--out", "off"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["status"] == "ok"


# -- normal runs are never flagged ------------------------------------------------------------------
@pytest.mark.parametrize("rule, options", [
    ("backprop", {}),
    ("feedback_alignment", {}),
    ("vfa", {}),                 # generative: an ELBO-like loss far from the classifiers' 2.3
    ("gan", {"recon_steps": 2}),  # two players, loss halving in a few steps (recon_steps: evaluation only)
    ("dfc", {}),
    ("local_fa", {}),            # a reconstruction loss that starts near 0.05
])
def test_default_runs_of_every_kind_of_rule_are_not_flagged(rule, options, tmp_path):
    config = TrainConfig(rule=rule, dataset="digits", epochs=2, batch_size=128, model_options={"depth": 1, "width": 32},
                         rule_options=options, device="cpu")
    trainer = runs.new_trainer(config, tmp_path / "run", progress=False)
    assert trainer.run()["status"] == "ok"
    assert trainer.first_step_loss > 0  # the check had its reference and ran on every step


# -- the reference and the step numbering -------------------------------------------------------------
def _spike_in_epoch_3(n):
    """1 at the first step, 0.001 after, 1500 at epoch 3's step 2 (the epoch's mean, 250, is also
    past 1000 times the first epoch's, 0.1675: only the step check names the step)."""
    return 1.0 if n == 0 else 1500.0 if n == 2 * STEPS_PER_EPOCH + 1 else 1e-3


SPIKE_MESSAGE = ("rule 'spiky' diverged at epoch 3, step 2: training loss 1500 exceeds 1000 times the first "
                 "step's (1); the checkpoint of epoch 2 is kept")


def test_a_loss_past_the_factor_is_divergence_at_its_own_step(tmp_path):
    trainer = _trainer(tmp_path, _counting_rule(_spike_in_epoch_3), epochs=4)
    with pytest.raises(Diverged) as e:
        trainer.run()
    assert str(e.value) == SPIKE_MESSAGE
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["diverged_epoch"], summary["epochs"], summary["error"]) == \
        ("diverged", 3, 2, SPIKE_MESSAGE)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def test_the_first_step_loss_is_saved_and_a_resumed_run_measures_against_it(tmp_path):
    rule = _counting_rule(_spike_in_epoch_3)
    _trainer(tmp_path, rule, epochs=2).run()  # stopped after epoch 2 ...
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["first_step_loss"] == 1.0 and type(ckpt["first_step_loss"]) is float
    resumed = _trainer(tmp_path, rule, epochs=4)  # ... and continued: the same step, the same message
    resumed.load(tmp_path / "checkpoint.pt")
    assert resumed.first_step_loss == 1.0
    with pytest.raises(Diverged) as e:
        resumed.run()
    assert str(e.value) == SPIKE_MESSAGE


def test_a_resumed_real_run_keeps_the_reference_bit_for_bit(tmp_path):
    config = TrainConfig(rule="backprop", dataset="digits", epochs=2, batch_size=256, model_options={"depth": 1, "width": 8},
                         device="cpu")
    whole = runs.new_trainer(config, tmp_path / "whole", progress=False)
    whole.run()
    runs.new_trainer(TrainConfig(**{**config.to_dict(), "epochs": 1}), tmp_path / "parts", progress=False).run()
    resumed = runs.resume_trainer(tmp_path / "parts", epochs=2, progress=False)
    resumed.run()
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert a["first_step_loss"] == b["first_step_loss"] == whole.first_step_loss
    assert all(torch.equal(a["params"]["model"][k], v) for k, v in b["params"]["model"].items())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_losses_are_compared_in_magnitude_and_a_zero_first_loss_gives_no_reference(sign, tmp_path):
    growing = _counting_rule(lambda n: sign * 10.0 ** n)  # 1, 10, 100, 1000, 10^4: past 1000x at step 5
    with pytest.raises(Diverged) as e:
        _trainer(tmp_path / "growing", growing, epochs=1).run()
    assert str(e.value) == (f"rule 'spiky' diverged at epoch 1, step 5: training loss {sign * 1e4:.4g} "
                            f"exceeds 1000 times the first step's ({sign:g})")
    from_zero = _counting_rule(lambda n: 0.0 if n == 0 else sign * 1e6)  # nothing to be a multiple of
    assert _trainer(tmp_path / "zero", from_zero, epochs=1).run()["status"] == "ok"


def test_the_epoch_mean_check_still_catches_a_loss_that_fell_and_grew_back(tmp_path):
    # 1 then 0.001 in epoch 1 (mean 0.1675), 500 from epoch 2 on: under 1000x the first step's
    fell_and_grew = _counting_rule(lambda n: 1.0 if n == 0 else 1e-3 if n < STEPS_PER_EPOCH else 500.0)
    with pytest.raises(Diverged) as e:
        _trainer(tmp_path, fell_and_grew, epochs=3).run()
    assert str(e.value) == ("rule 'spiky' diverged at epoch 2: mean training loss 500 exceeds 1000 times the first "
                            "epoch's (0.1675); the checkpoint of epoch 1 is kept")


def _failing_at(n_bad, what) -> Rule:
    """Loss 1 and zero updates, except at training step `n_bad` (from 0): a NaN loss or a NaN update."""

    def init(network, params, generator):
        return params, {"n": 0}

    def step(network, params, state, batch):
        updates = _zeros(params)
        bad = state["n"] == n_bad
        if bad and what == "update":
            updates["model"]["blocks.1.layer.bias"][0] = float("nan")
        return updates, {"n": state["n"] + 1}, {"loss": float("nan") if bad and what == "loss" else 1.0}

    return Rule(init=init, step=step)


def test_every_message_names_a_step_by_its_epoch_and_its_place_in_it(tmp_path):
    # before: the same step was "step 3" for a NaN loss and "step 9" (the run's count) for a NaN update
    n_bad = STEPS_PER_EPOCH + 2  # epoch 2, step 3
    with pytest.raises(Diverged, match=r"^rule 'spiky' diverged at epoch 2, step 3 \(loss=nan\);"):
        _trainer(tmp_path / "loss", _failing_at(n_bad, "loss"), epochs=2).run()
    with pytest.raises(Diverged, match=r"^rule 'spiky' returned a non-finite update for model/blocks.1.layer.bias at "
                                       r"epoch 2, step 3 \(not applied\);"):
        _trainer(tmp_path / "update", _failing_at(n_bad, "update"), epochs=2).run()


# -- benchmark rows ------------------------------------------------------------------------------------
def test_a_benchmark_cell_diverging_in_its_first_epoch_is_a_diverged_row_and_the_suite_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(get_registry().rules, "spiky", RuleSpec(
        "spiky", lambda: _counting_rule(lambda n: 1.0 if n == 0 else 5000.0), "loss 5000x its first step's"))
    suite = bench.suite_from_dict({
        "rules": ["backprop", "spiky"], "seeds": [0],
        "settings": {"dataset": "digits", "epochs": 1, "depth": 1, "width": 16, "batch_size": 256}})
    rows = bench.run_suite(suite, tmp_path / "out")
    by_rule = {r["rule"]: r for r in rows}
    assert by_rule["backprop"]["status"] == "ok"
    spiky = by_rule["spiky"]  # before: "ok", its loss 4000 times the first step's
    assert spiky["status"] == "diverged"
    assert spiky["error"] == "rule 'spiky' diverged at epoch 1, step 2: training loss 5000 exceeds 1000 times the first step's (1)"
    failures = (tmp_path / "out" / "report.md").read_text().split("## Failures and notes", 1)[1]
    assert "spiky" in failures and "diverged at epoch 1, step 2" in failures
