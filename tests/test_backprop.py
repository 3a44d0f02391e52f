import pytest
import torch
import torch.nn.functional as F

from fa_rules import models as zoo
from fa_rules.core.rule import Batch
from fa_rules.rules.backprop import backprop


@pytest.mark.parametrize("build,shape", [
    (lambda: zoo.mlp((1, 8, 8), (10,), depth=3, width=32), (1, 8, 8)),
    (lambda: zoo.lenet((1, 16, 16), (10,)), (1, 16, 16)),
])
def test_backprop_updates_equal_loss_backward(build, shape):
    torch.manual_seed(0)
    net = build()
    x, y = torch.rand(16, *shape), torch.randint(0, 10, (16,))
    rule = backprop()
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator())
    updates, _, metrics = rule.step(net, params, state, Batch(x, y))

    # independent reference: the same nn.Module, ordinary autograd
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    for name, p in net.named_parameters():
        assert torch.allclose(updates["model"][name], p.grad, atol=1e-6), name
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-6
