import pytest
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


def _tied_mlp():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    net[2].weight = net[0].weight
    return net


def test_call_with_is_functional_call_values_gradients_and_restores_the_module():
    from torch.func import functional_call

    from fa_rules.core.network import parameter_slots, call_with

    torch.manual_seed(0)
    cases = [(zoo.lenet((1, 12, 12), (10,)), torch.rand(4, 1, 12, 12)),
             (zoo.resnet((1, 8, 8), (10,), depth=8).eval(), torch.rand(4, 1, 8, 8)),
             (_tied_mlp(), torch.rand(4, 3))]
    for net, x in cases:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        params = {k: torch.randn_like(v) for k, v in net.named_parameters()}

        def loss(p, call):
            return call(net, p, (x,)).square().sum()

        for transform in (torch.func.grad, lambda f: (lambda p: torch.autograd.grad(f(p), list(p.values()), allow_unused=True))):
            fast = transform(lambda p: loss(p, call_with))({k: v.requires_grad_() for k, v in params.items()})
            slow = transform(lambda p: loss(p, functional_call))(params)
            fast, slow = (list(g.values()) if isinstance(g, dict) else list(g) for g in (fast, slow))
            for a, b in zip(fast, slow):
                assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
        # only some parameters given: the rest are the module's own
        some = dict(list(params.items())[:1])
        with torch.no_grad():
            assert torch.allclose(call_with(net, some, (x,)), functional_call(net, some, (x,)), atol=1e-6)
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # restored (the resnet is in eval mode)
        assert all(isinstance(p, torch.nn.Parameter) for _, p in net.named_parameters())
    # the fast swap serves the block networks; tied weights go through functional_call
    assert parameter_slots(cases[0][0]) is not None and parameter_slots(cases[2][0]) is None


def test_call_with_restores_the_parameters_when_the_forward_raises():
    from fa_rules.core.network import call_with

    net = zoo.mlp((1, 8, 8), (3,), depth=1, width=4)
    original = dict(net.named_parameters())
    params = {k: torch.zeros_like(v) for k, v in original.items()}
    with pytest.raises(RuntimeError):
        call_with(net, params, (torch.rand(2, 7),))  # wrong input size
    assert all(p is original[k] for k, p in net.named_parameters())


@pytest.mark.parametrize("model", ["mlp", "lenet", "vgg", "resnet20"])
def test_the_memory_check_before_a_build_leaves_initialisation_and_randomness_alone(model, monkeypatch):
    from fa_rules.core import network
    from fa_rules.plugins.manager import get_registry

    spec = get_registry().model(model)
    built = []
    for available in (lambda: 2**40, lambda: None):  # counted on the meta device first; not counted
        monkeypatch.setattr(network, "available_memory", available)
        torch.manual_seed(0)
        built.append((list(spec.make((1, 28, 28), (10,)).parameters()), torch.rand(3)))
    (checked, after_checked), (unchecked, after_unchecked) = built
    assert all(torch.equal(p, q) for p, q in zip(checked, unchecked)) and torch.equal(after_checked, after_unchecked)
