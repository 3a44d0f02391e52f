"""A training loss that is not finite stops the run with `Diverged`: NaN, +inf and -inf alike."""

import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core import Rule, no_state_init
from fa_rules.core.trainer import Diverged, TrainConfig, Trainer
from fa_rules.plugins.datasets import load_digits


def _rule_with_loss(value: float, from_call: int) -> Rule:
    """Zero updates; the loss is 1 until call `from_call` of `step`, then `value`."""
    calls = {"n": 0}

    def step(network, params, state, batch):
        calls["n"] += 1
        updates = {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}
        return updates, state, {"loss": torch.tensor(value if calls["n"] >= from_call else 1.0)}

    return Rule(init=no_state_init, step=step)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_loss_that_is_not_finite_is_divergence(value, tmp_path):
    # the first call is the memory probe of step 1; call 4 is training step 3
    trainer = Trainer(TrainConfig(epochs=2, batch_size=256, device="cpu"), _rule_with_loss(value, from_call=4),
                      lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tmp_path, progress=False)
    with pytest.raises(Diverged, match=rf"diverged at epoch 1, step 3 \(loss={value}\)"):
        trainer.run()
    assert trainer.epoch == 0 and not (tmp_path / "checkpoint.pt").exists()



def _updates(*tensors):
    return {"model": {f"w{i}": t for i, t in enumerate(tensors)}, "feedback": {"b": torch.ones(3)}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [("model", "w0"), ("model", "w2"), ("feedback", "b")])
def test_a_nonfinite_update_is_found_and_named(value, where):
    from fa_rules.core.trainer import nonfinite_update

    updates = _updates(torch.ones(4, 5), torch.ones(0), torch.ones(2))
    updates[where[0]][where[1]] = updates[where[0]][where[1]].clone()
    updates[where[0]][where[1]].view(-1)[-1] = value
    assert nonfinite_update(updates) == where


def test_finite_updates_whose_sum_overflows_are_finite():
    from fa_rules.core.trainer import nonfinite_update

    # the fast check sums: 3e38 + 3e38 overflows float32, the exact check must clear it
    assert nonfinite_update(_updates(torch.full((2,), 3e38), torch.full((3,), -3e38))) is None
    assert nonfinite_update(_updates(torch.ones(2), torch.ones(0))) is None
    assert nonfinite_update({}) is None
