"""Step metrics stay on the device and come to the host once per logging interval; the epoch
means and the divergence check are what they were when every step was converted at once."""

import statistics

import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core import Rule, no_state_init
from fa_rules.core import trainer as trainer_module
from fa_rules.core.trainer import LOG_EVERY, Diverged, StepMetricsLog, TrainConfig, Trainer, step_seed
from fa_rules.plugins.datasets import load_digits


def _recording_rule(recorded: dict, nan_from_call: int | None = None) -> Rule:
    """Zero updates; loss and `extra` metrics vary per batch (recorded by batch seed as floats,
    as the trainer converted them before); from call `nan_from_call` on the loss is NaN."""
    calls = {"n": 0}

    def step(network, params, state, batch):
        calls["n"] += 1
        loss = torch.tensor(float("nan")) if nan_from_call and calls["n"] >= nan_from_call else batch.x.mean() * 3.1
        recorded[batch.seed] = (float(loss), float(batch.x.std()))
        updates = {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}
        return updates, state, {"loss": loss, "extra": batch.x.std(), "count": 2, "vector": batch.x[0]}

    return Rule(init=no_state_init, step=step)


def _trainer(rule, tmp_path, **config):
    return Trainer(TrainConfig(device="cpu", **config), rule, lambda: zoo.mlp((1, 8, 8), (10,), width=8),
                   load_digits(), tmp_path, progress=False)


def test_epoch_means_equal_the_per_step_floats_and_the_host_sees_the_metrics_once_per_interval(tmp_path, monkeypatch):
    flushes = []
    flush = StepMetricsLog.flush
    monkeypatch.setattr(StepMetricsLog, "flush", lambda self: flushes.append(1) or flush(self))
    recorded = {}
    trainer = _trainer(_recording_rule(recorded), tmp_path, epochs=2, batch_size=32)
    steps = trainer.steps_per_epoch(trainer.data.train_x.shape[0])
    assert steps > LOG_EVERY  # the test needs more than one interval per epoch
    trainer.run()
    assert len(flushes) == 2 * -(-steps // LOG_EVERY)  # ceil(steps / LOG_EVERY) per epoch
    for epoch in range(2):
        part = [recorded[step_seed(0, s)] for s in range(epoch * steps, (epoch + 1) * steps)]
        record = trainer.history[epoch]
        assert record["train_loss"] == statistics.fmean(loss for loss, _ in part)
        assert record["train_extra"] == statistics.fmean(extra for _, extra in part)
        assert record["train_count"] == 2.0 and "train_vector" not in record


@pytest.mark.parametrize("step", [LOG_EVERY - 1, LOG_EVERY + 5])
def test_a_non_finite_loss_is_named_by_its_own_step_even_when_seen_at_the_end_of_the_interval(step, tmp_path):
    # call 1 is the memory probe, so call step + 1 is training step `step`
    trainer = _trainer(_recording_rule({}, nan_from_call=step + 1), tmp_path, epochs=1, batch_size=32)
    with pytest.raises(Diverged, match=rf"diverged at epoch 1, step {step} \(loss=nan\)$"):
        trainer.run()
    # stopped at the end of the interval holding the step, not later
    assert trainer.global_step == -(-step // LOG_EVERY) * LOG_EVERY
    assert trainer.epoch == 0


def test_flush_keeps_float_values_exact():
    log = StepMetricsLog()
    values = [torch.tensor(0.1, dtype=torch.float32), torch.tensor(1 / 3, dtype=torch.float64), 7]
    for v in values:
        log.add({"loss": v, "other": v}, torch.device("cpu"))
    first, losses = log.flush()
    assert first == 0 and losses == [float(v) for v in values] == log.others["other"]
    assert log.flush() == (3, [])
    assert trainer_module.LOG_EVERY == LOG_EVERY
