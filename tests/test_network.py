import torch

from fa_rules import models as zoo
from fa_rules.core.network import Asinh, inverse_activation, make_activation


def test_functional_apply_matches_module_forward_and_block_chain():
    torch.manual_seed(0)
    net = zoo.lenet((1, 12, 12), (10,))
    params = net.init_params()
    x = torch.rand(5, 1, 12, 12)
    out = net.apply(params, x)
    assert torch.allclose(out, net(x), atol=1e-6)
    h = x
    hs, _ = net.activations(params, x)
    for i in range(net.num_blocks):
        h = net.block_apply(i, params, h)
        assert torch.allclose(h, hs[i], atol=1e-6)
    assert torch.allclose(h, out, atol=1e-6)


def test_block_apply_uses_given_params_not_module_weights():
    net = zoo.mlp((1, 8, 8), (3,), depth=1, width=4)
    params = {k: torch.zeros_like(v) for k, v in net.init_params().items()}
    assert torch.equal(net.apply(params, torch.rand(2, 1, 8, 8)), torch.zeros(2, 3))


def test_heads_and_pre_activation():
    net = zoo.mlp((1, 8, 8), (4,), heads={"mu": 4, "logvar": 4}, depth=2, width=16)
    params = net.init_params()
    out = net.apply(params, torch.rand(3, 1, 8, 8))
    assert set(out) == {"mu", "logvar"} and out["mu"].shape == (3, 4)
    a = net.block_apply(0, params, torch.rand(3, 1, 8, 8), pre_activation=True)
    assert a.shape == (3, 16)


def test_inverse_activations_are_exact():
    y = torch.linspace(-3, 3, 101)
    for name in ("asinh", "leaky_relu", "identity"):
        act = make_activation(name)
        assert torch.allclose(inverse_activation(act, act(y)), y, atol=1e-5), name
    assert isinstance(make_activation("asinh"), Asinh)
