"""Every test metric covers the whole test split, whatever `eval_batch_size` cuts it into.

digits' test split has 360 images; with `eval_batch_size` 50 it is evaluated in 8 chunks, the last
one of 10 images. Each metric a run records is recomputed here directly, in one pass over the whole
split (and the alignment angles on the first `batch_size` training examples), and the first
chunk alone is checked to give a different value (so a metric over one chunk would be caught)."""

import pytest
import torch
import torch.nn.functional as F

from fa_rules.core.config import TrainConfig
from fa_rules.core.data import as_float
from fa_rules.runs import new_trainer

EVAL_BATCH = 50
TRAIN_BATCH = 64  # differs from EVAL_BATCH: the alignment batch is a training batch


def _trained(tmp_path, rule, **fields):
    config = TrainConfig(rule=rule, dataset="digits", epochs=1, batch_size=TRAIN_BATCH, device="cpu",
                         eval_batch_size=EVAL_BATCH, model_options={"width": 16, "depth": 1}, latent_dim=8, **fields)
    trainer = new_trainer(config, tmp_path / rule, progress=False)
    summary = trainer.run()
    assert trainer.data.test_x.shape[0] == 360 and 360 % EVAL_BATCH != 0
    return trainer, summary


def _angle(u: torch.Tensor, g: torch.Tensor) -> float:
    u, g = u.double(), g.double()
    return float(torch.rad2deg(torch.arccos((u @ g / (u.norm() * g.norm())).clamp(-1, 1))))


def test_classifier_metrics_and_alignment_angles_cover_what_they_promise(tmp_path):
    trainer, summary = _trained(tmp_path, "feedback_alignment")
    net, model = trainer.network, trainer.params["model"]
    x, y = as_float(trainer.data.test_x), trainer.data.test_y

    def direct(n):
        with torch.no_grad():
            logits = net.apply(model, x[:n])
        return (logits.argmax(1) == y[:n]).double().mean().item(), F.cross_entropy(logits, y[:n]).item()

    accuracy, loss = direct(360)
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert direct(EVAL_BATCH) != pytest.approx((accuracy, loss), rel=1e-3)  # one chunk would differ

    # alignment angles: the rule's update against the exact gradient, per block, on the first
    # batch_size training examples
    batch = trainer.alignment_batch()

    def angles(xb, yb):
        from fa_rules.core.rule import Batch

        updates, _, _ = trainer.rule.step(net, trainer.params, trainer.state, Batch(xb, yb, batch.seed))
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.items()}
        torch.autograd.backward(F.cross_entropy(net.apply(params, xb), yb))
        out = []
        for keys in [*net.block_keys, *net.head_keys.values()]:
            if keys:
                u = torch.cat([updates["model"][k].flatten() for k in keys])
                g = torch.cat([params[k].grad.flatten() for k in keys])
                out.append(_angle(u, g))
        return out

    train_x, train_y = as_float(trainer.data.train_x), trainer.data.train_y
    expected = angles(train_x[:TRAIN_BATCH], train_y[:TRAIN_BATCH])
    assert len(expected) == 2 and expected[0] > 1.0  # the hidden block's feedback is random (the head's is exact)
    assert summary["alignment_angle_deg"] == pytest.approx(expected, abs=1e-4)
    assert torch.equal(batch.x, train_x[:TRAIN_BATCH]) and torch.equal(batch.y, train_y[:TRAIN_BATCH])
    for n in (EVAL_BATCH, train_x.shape[0]):  # another batch gives other angles
        assert angles(train_x[:n], train_y[:n]) != pytest.approx(expected, abs=1e-2)


def test_reconstruction_error_covers_the_whole_split(tmp_path):
    trainer, summary = _trained(tmp_path, "ae")
    x = as_float(trainer.data.test_x)

    def direct(n):
        generator = torch.Generator().manual_seed(trainer.config.seed)
        recon = trainer.rule.reconstruct(trainer.network, trainer.params, trainer.state, x[:n], generator)
        return (recon.detach() - x[:n]).pow(2).mean().item()

    assert summary["test_recon_mse"] == pytest.approx(direct(360), rel=1e-5)
    assert direct(EVAL_BATCH) != pytest.approx(direct(360), rel=1e-3)  # one chunk would differ
