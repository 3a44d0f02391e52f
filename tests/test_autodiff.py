"""The probe-mode (plain autograd) grad/vjp agree with torch.func, and the probe measures bytes."""

import torch

from fa_rules.core import autodiff
from fa_rules import models as zoo


def _inner_flow_loss(params, net, x):
    # second order: an inner gradient step on the input, differentiated with respect to params
    def energy(r):
        return (net.apply(params, r) - net.apply(params, x)).pow(2).sum()

    r = torch.zeros_like(x)
    for _ in range(2):
        r = r - 0.1 * autodiff.grad(energy)(r)
    return (r - x).pow(2).mean()


def test_probe_mode_matches_torch_func_including_second_order():
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (5,), depth=1, width=16)
    params = net.init_params()
    x = torch.rand(4, 1, 8, 8)
    g_func, v_func = autodiff.grad_and_value(_inner_flow_loss)(params, net, x)
    with autodiff.SavedTensorsProbe() as probe:
        g_probe, v_probe = autodiff.grad_and_value(_inner_flow_loss)(params, net, x)
    assert probe.peak > 0
    assert torch.allclose(v_func, v_probe)
    for k in params:
        assert torch.allclose(g_func[k], g_probe[k], atol=1e-6), k


def test_probe_mode_vjp_matches_torch_func():
    w = torch.randn(3, 4)
    h = torch.randn(5, 4)
    cot = torch.randn(5, 3)
    f = lambda w, h: torch.tanh(h @ w.T)  # noqa: E731
    out1, fn1 = autodiff.vjp(f, w, h)
    with autodiff.SavedTensorsProbe():
        out2, fn2 = autodiff.vjp(f, w, h)
        g2 = fn2(cot)
    g1 = fn1(cot)
    assert torch.allclose(out1, out2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_saved_bytes_grow_with_batch_and_are_released():
    net = zoo.mlp((1, 8, 8), (10,), depth=2, width=64)
    params = net.init_params()

    def loss(p, x):
        return net.apply(p, x).pow(2).mean()

    peaks = []
    for n in (32, 256):
        with autodiff.SavedTensorsProbe() as probe:
            autodiff.grad(loss)(params, torch.rand(n, 1, 8, 8))
        peaks.append(probe.peak)
        assert probe.current == 0  # everything saved was freed with the graph
    # activations dominate: 8x the batch is several times the bytes (weights are shared)
    assert peaks[1] > 3 * peaks[0]


def test_first_order_holds_only_where_no_backward_is_differentiated():
    """Where `first_order()` holds, feedback routing swaps saved tensors (first derivatives only)."""
    seen = {}

    def record(name, value):
        seen[name] = autodiff.first_order()
        return value

    w = torch.randn(3)
    record("outside", None)
    autodiff.grad(lambda p: record("grad", (p * p).sum()))(w)
    autodiff.grad(lambda p: autodiff.grad(lambda q: record("grad in grad", (q ** 3).sum()))(p).sum())(w)
    autodiff.vjp(lambda p: record("vjp", p * p), w)
    autodiff.grad(lambda p: autodiff.vjp(lambda q: record("vjp in grad", q * q), p)[0].sum())(w)
    with autodiff.SavedTensorsProbe():
        autodiff.grad(lambda p: record("grad in probe", (p * p).sum()))(w)
    torch.func.grad(lambda p: record("torch.func", (p * p).sum()))(w)
    assert seen == {"outside": False, "grad": True, "grad in grad": False, "vjp": True, "vjp in grad": False,
                    "grad in probe": False, "torch.func": False}


def test_closed_forms_are_allowed_only_at_the_top_of_a_plain_step():
    """Where `closed_form_allowed()` holds a rule may take first derivatives without a graph: not
    inside the function of a gradient or vjp (they differentiate through it), under the probe or
    torch.func."""
    seen = {}

    def record(name, value=None):
        seen[name] = autodiff.closed_form_allowed()
        return value

    w = torch.randn(3)
    record("outside")
    autodiff.grad(lambda p: record("in grad", (p * p).sum()))(w)
    autodiff.vjp(lambda p: record("in vjp", p * p), w)
    autodiff.grad(lambda p: autodiff.grad(lambda q: record("grad in grad", (q ** 3).sum()))(p).sum())(w)
    with autodiff.SavedTensorsProbe():
        record("in probe")
    with autodiff.functional_transforms():
        record("functional transforms")
    torch.func.grad(lambda p: record("torch.func", (p * p).sum()))(w)
    record("outside, after")
    assert seen == {"outside": True, "in grad": False, "in vjp": False, "grad in grad": False, "in probe": False,
                    "functional transforms": False, "torch.func": False, "outside, after": True}
