"""Layer-level feedback reaches every weight: blocks of raw parameters calling `F.linear` /
`F.conv2d` are trained with their feedback (against hand-written float64 references), parameters
no feedback tensor can stand in for are refused unless opted into `exact_gradient`, and each rule
lists which parameters it trains with feedback (`Rule.credit`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_rules import models as zoo
from fa_rules.core import Block, Network, UserError
from fa_rules.core.feedback import AFFINE_LAYERS, feedback_weight_keys, parameter_uses, weight_key
from fa_rules.core.metrics import angle_deg, backprop_gradient
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, declared_weight_decay, make_optimizers
from fa_rules.plugins.manager import get_registry

LAYER_RULES = ["feedback_alignment", "sign_symmetry", "kolen_pollack", "brsf", "frsf"]
SHAPE = (1, 8, 8)


# -- blocks of raw parameters ----------------------------------------------------------------------
class RawDense(nn.Module):
    """`tanh(F.linear(x, W, b))` (no tanh for the output block) on raw parameters."""

    def __init__(self, fan_in: int, fan_out: int, last: bool = False):
        super().__init__()
        self.W = nn.Parameter(torch.randn(fan_out, fan_in) / math.sqrt(fan_in))
        self.b = nn.Parameter(torch.randn(fan_out) * 0.1)
        self.last = last

    def forward(self, x):
        a = F.linear(x.flatten(1), self.W, self.b)
        return a if self.last else torch.tanh(a)


class RawMLP(nn.Module):
    """A whole 64-16-16-10 tanh MLP in one block of raw parameters."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([RawDense(64, 16), RawDense(16, 16), RawDense(16, 10, last=True)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RawConvs(nn.Module):
    """`relu(conv(relu(conv(x))))` with raw kernels (3x3, padding 1), then a raw linear readout."""

    def __init__(self):
        super().__init__()
        self.K1 = nn.Parameter(torch.randn(3, 1, 3, 3) / 3)
        self.c1 = nn.Parameter(torch.randn(3) * 0.1)
        self.K2 = nn.Parameter(torch.randn(4, 3, 3, 3) / math.sqrt(27))
        self.c2 = nn.Parameter(torch.randn(4) * 0.1)
        self.W = nn.Parameter(torch.randn(10, 4 * 8 * 8) / 16)
        self.b = nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x):
        h = torch.relu(F.conv2d(x, self.K1, self.c1, padding=1))
        h = torch.relu(F.conv2d(h, self.K2, self.c2, padding=1))
        return F.linear(h.flatten(1), self.W, self.b)


class TiedPair(nn.Module):
    """Two Linear layers sharing one weight: `tanh(b(tanh(a(x))))`, `b.weight is a.weight`."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.b.weight = self.a.weight

    def forward(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))


class MatmulDense(nn.Module):
    """`tanh(x @ W)`: a weight used by matmul, which no feedback tensor can stand in for."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(fan_in, fan_out) / math.sqrt(fan_in))

    def forward(self, x):
        return torch.tanh(x @ self.W)


def _net(*blocks) -> Network:
    return Network(list(blocks), in_shape=SHAPE, out_shape=(10,))


def _raw_blocks() -> Network:
    return _net(RawDense(64, 16), RawDense(16, 16), RawDense(16, 10, last=True))


def _raw_one_block() -> Network:
    return _net(RawMLP())


def _make(rule_name, net, n=16, seed=0, double=True, **options):
    torch.manual_seed(seed)
    if double:
        net = net.double()
    dtype = torch.float64 if double else torch.float32
    x, y = torch.rand(n, *SHAPE, dtype=dtype), torch.randint(0, 10, (n,))
    rule = get_registry().rule(rule_name).make(**options)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(seed + 1))
    return net, rule, params, state, Batch(x, y)


def _output_error(logits, y):
    """e = dJ/d(logits) for the mean cross-entropy: (softmax - one-hot) / N."""
    return (torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / y.shape[0]


def _dense_chain_reference(x, y, layers):
    """The paper's updates for a chain of dense layers, written out: `layers` is a list of
    `(weight key, W, bias key, b, B)` with `a_l = h_{l-1} W_l^T + b_l`, `h_l = tanh(a_l)` (the last
    gives the logits), `delta_L = e`, `delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)`; each weight's
    update is `delta_l^T h_{l-1}`, summed over the layers that share it."""
    hs, pre = [x.flatten(1)], []
    for i, (_, W, _, b, _) in enumerate(layers):
        a = hs[-1] @ W.T + b
        pre.append(a)
        hs.append(a if i == len(layers) - 1 else torch.tanh(a))
    delta = _output_error(pre[-1], y)
    updates = {}
    for i in reversed(range(len(layers))):
        wkey, _, bkey, _, _ = layers[i]
        updates[wkey] = updates.get(wkey, 0) + delta.T @ hs[i]
        updates[bkey] = delta.sum(0)
        if i:
            delta = (delta @ layers[i][4]) * (1 - torch.tanh(pre[i - 1]) ** 2)
    return updates


def _assert_close(updates, expected):
    assert set(updates) == set(expected)
    for k, u in updates.items():
        assert torch.allclose(u, expected[k], rtol=0, atol=1e-10), (k, (u - expected[k]).abs().max().item())


# -- feedback reaches raw weights --------------------------------------------------------------------
@pytest.mark.parametrize("build, prefix", [(_raw_blocks, ["blocks.0.", "blocks.1.", "blocks.2."]),
                                           (_raw_one_block, ["blocks.0.layers.0.", "blocks.0.layers.1.",
                                                             "blocks.0.layers.2."])])
def test_fa_on_raw_linear_weights_equals_the_papers_formulas_and_is_not_backprop(build, prefix):
    net, rule, params, state, batch = _make("feedback_alignment", build())
    p, fb = params["model"], state["feedback"]
    assert list(fb) == [f"{q}W" for q in prefix]  # every raw weight, in named_parameters order
    updates, _, _ = rule.step(net, params, state, batch)
    layers = [(f"{q}W", p[f"{q}W"], f"{q}b", p[f"{q}b"], fb[f"{q}W"]) for q in prefix]
    _assert_close(updates["model"], _dense_chain_reference(batch.x, batch.y, layers))
    reference = backprop_gradient(net, p, batch)
    for q in prefix[:2]:
        assert angle_deg(updates["model"][f"{q}W"], reference[f"{q}W"]) > 1, q


def _unfold_conv(x, K, c):
    """`conv2d(x, K, c, padding=1)` as a matmul over 3x3 patches: `(columns, output)`."""
    cols = F.unfold(x, 3, padding=1)  # (N, C*9, H*W)
    out = K.reshape(K.shape[0], -1) @ cols + c[None, :, None]
    return cols, out.reshape(x.shape[0], K.shape[0], *x.shape[2:])


def test_fa_on_raw_conv2d_kernels_equals_a_hand_written_reference():
    net, rule, params, state, batch = _make("feedback_alignment", _net(RawConvs()))
    p, fb = params["model"], state["feedback"]
    assert list(fb) == ["blocks.0.K1", "blocks.0.K2", "blocks.0.W"]
    updates, _, _ = rule.step(net, params, state, batch)
    x = batch.x
    K1, c1, K2, c2, W, b = (p[f"blocks.0.{k}"] for k in ("K1", "c1", "K2", "c2", "W", "b"))
    cols1, a1 = _unfold_conv(x, K1, c1)
    h1 = torch.relu(a1)
    cols2, a2 = _unfold_conv(h1, K2, c2)
    h2 = torch.relu(a2)
    logits = h2.flatten(1) @ W.T + b
    e = _output_error(logits, batch.y)
    d2 = (e @ fb["blocks.0.W"]).reshape(a2.shape) * (a2 > 0)  # delta_a2 = (B_W^T e) * f'(a2)
    # the transposed convolution with B_K2: patch columns through B^T, folded back onto h1
    g_cols = fb["blocks.0.K2"].reshape(4, -1).T @ d2.flatten(2)
    d1 = F.fold(g_cols, (8, 8), 3, padding=1) * (a1 > 0)
    def kernel_update(d, cols, K):  # delta_a x^T over the patches, summed over examples and positions
        return (d.flatten(2) @ cols.transpose(1, 2)).sum(0).reshape(K.shape)

    expected = {"blocks.0.W": e.T @ h2.flatten(1), "blocks.0.b": e.sum(0),
                "blocks.0.K2": kernel_update(d2, cols2, K2), "blocks.0.c2": d2.sum((0, 2, 3)),
                "blocks.0.K1": kernel_update(d1, cols1, K1), "blocks.0.c1": d1.sum((0, 2, 3))}
    _assert_close(updates["model"], expected)
    assert angle_deg(updates["model"]["blocks.0.K1"], backprop_gradient(net, p, batch)["blocks.0.K1"]) > 1


def test_sign_symmetry_uses_its_feedback_on_raw_weights():
    net, rule, params, state, batch = _make("sign_symmetry", _raw_blocks())
    p = params["model"]
    updates, _, _ = rule.step(net, params, state, batch)
    reference = backprop_gradient(net, p, batch)
    assert angle_deg(updates["model"]["blocks.0.W"], reference["blocks.0.W"]) > 1
    # with B = mean|W| sign(W) written out, it is the paper's update
    layers = [(f"blocks.{i}.W", p[f"blocks.{i}.W"], f"blocks.{i}.b", p[f"blocks.{i}.b"],
               torch.sign(p[f"blocks.{i}.W"]) * p[f"blocks.{i}.W"].abs().mean()) for i in range(3)]
    _assert_close(updates["model"], _dense_chain_reference(batch.x, batch.y, layers))


@pytest.mark.parametrize("rule_name", ["brsf", "frsf"])
def test_random_magnitude_sign_feedback_reaches_raw_weights(rule_name):
    net, rule, params, state, batch = _make(rule_name, _raw_blocks())
    updates, _, _ = rule.step(net, params, state, batch)
    reference = backprop_gradient(net, params["model"], batch)
    assert angle_deg(updates["model"]["blocks.0.W"], reference["blocks.0.W"]) > 1
    assert rule.credit(net, params, state)["feedback"] == ["blocks.0.W", "blocks.1.W", "blocks.2.W"]


@pytest.mark.parametrize("build", [_raw_blocks, _raw_one_block])
def test_kolen_pollack_trains_raw_weights_with_a_feedback_group(build):
    net, rule, params, state, batch = _make("kolen_pollack", build(), n=32, double=False)
    assert list(params["feedback"]) == [k for k in params["model"] if k.endswith(".W")]
    before = {g: {k: v.clone() for k, v in group.items()} for g, group in params.items()}
    optimizers = make_optimizers(TrainConfig(lr=1e-3), params)
    decay = declared_weight_decay("kolen_pollack", rule, net, params)
    for _ in range(5):
        updates, state, metrics = rule.step(net, params, state, batch)
        apply_updates(rule, params, updates, optimizers, decay)
        assert math.isfinite(float(metrics["loss"]))
    for group in ("model", "feedback"):  # both W and B moved
        assert all(not torch.equal(params[group][k], before[group][k]) for k in params["feedback"]), group


def test_a_weight_shared_by_two_linear_calls_gets_one_feedback_tensor():
    net = _net(RawDense(64, 16), TiedPair(16), RawDense(16, 10, last=True))
    net, rule, params, state, batch = _make("feedback_alignment", net)
    p, fb = params["model"], state["feedback"]
    assert list(fb) == ["blocks.0.W", "blocks.1.a.weight", "blocks.2.W"]
    updates, _, _ = rule.step(net, params, state, batch)
    shared = "blocks.1.a.weight"
    layers = [("blocks.0.W", p["blocks.0.W"], "blocks.0.b", p["blocks.0.b"], fb["blocks.0.W"]),
              (shared, p[shared], "blocks.1.a.bias", p["blocks.1.a.bias"], fb[shared]),
              (shared, p[shared], "blocks.1.b.bias", p["blocks.1.b.bias"], fb[shared]),
              ("blocks.2.W", p["blocks.2.W"], "blocks.2.b", p["blocks.2.b"], fb["blocks.2.W"])]
    _assert_close(updates["model"], _dense_chain_reference(batch.x, batch.y, layers))


def test_a_parameter_used_twice_in_one_module_is_one_key():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x):
            return torch.tanh(F.linear(torch.tanh(F.linear(x, self.W)), self.W))

    net, rule, params, state, _ = _make("feedback_alignment", _net(RawDense(64, 16), Twice(), RawDense(16, 10, True)))
    assert list(state["feedback"]) == ["blocks.0.W", "blocks.1.W", "blocks.2.W"]
    assert parameter_uses(net, params["model"])["blocks.1.W"] == ("weight",)


# -- refusal and opt-in -------------------------------------------------------------------------------
def _matmul_net():
    return _net(RawDense(64, 16), MatmulDense(16, 16), RawDense(16, 10, last=True))


@pytest.mark.parametrize("rule_name", LAYER_RULES)
def test_a_weight_used_by_matmul_is_refused_in_one_line_naming_it_and_the_opt_in(rule_name):
    with pytest.raises(UserError) as info:
        _make(rule_name, _matmul_net())
    message = str(info.value)
    assert "\n" not in message and f"'{rule_name}'" in message
    assert "'blocks.1.W'" in message and "matmul" in message and "exact_gradient=blocks.1.W" in message


def test_an_opted_in_weight_trains_by_its_exact_gradient_and_is_listed_so():
    net, rule, params, state, batch = _make("feedback_alignment", _matmul_net(), exact_gradient="blocks.1.W")
    p, fb = params["model"], state["feedback"]
    assert list(fb) == ["blocks.0.W", "blocks.2.W"]
    updates, _, _ = rule.step(net, params, state, batch)
    # the matmul sends the signal back through W itself (laid out (in, out): W^T is the linear weight)
    no_bias = torch.zeros(16, dtype=torch.float64)
    layers = [("blocks.0.W", p["blocks.0.W"], "blocks.0.b", p["blocks.0.b"], fb["blocks.0.W"]),
              ("blocks.1.W", p["blocks.1.W"].T, "none", no_bias, p["blocks.1.W"].T),
              ("blocks.2.W", p["blocks.2.W"], "blocks.2.b", p["blocks.2.b"], fb["blocks.2.W"])]
    expected = _dense_chain_reference(batch.x, batch.y, layers)
    expected["blocks.1.W"] = expected["blocks.1.W"].T
    del expected["none"]
    _assert_close(updates["model"], expected)
    credit = rule.credit(net, params, state)
    assert credit == {"feedback": ["blocks.0.W", "blocks.2.W"],
                      "exact_gradient": ["blocks.0.b", "blocks.1.W", "blocks.2.b"]}


def test_a_parameter_added_by_hand_is_refused_too():
    """`x + b` alone would be harmless, but a sum can also become a weight (`F.linear(x, W + D)`),
    so any use but a linear map's or convolution's bias or a normalisation's is refused."""

    class AddedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.b = nn.Linear(16, 16, bias=False), nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return torch.tanh(self.lin(x) + self.b)

    net = _net(RawDense(64, 16), AddedBias(), RawDense(16, 10, last=True))
    with pytest.raises(UserError, match=r"parameter 'blocks\.1\.b': it is used in add, .*exact_gradient=blocks\.1\.b$"):
        _make("feedback_alignment", net)
    _, rule, params, state, _ = _make("feedback_alignment", net, exact_gradient="*.b")
    assert list(state["feedback"]) == ["blocks.0.W", "blocks.1.lin.weight", "blocks.2.W"]


@pytest.mark.parametrize("rule_name", LAYER_RULES)
def test_every_layer_rule_trains_with_an_opt_in_pattern(rule_name):
    net, rule, params, state, batch = _make(rule_name, _matmul_net(), double=False, exact_gradient="blocks.1.*")
    updates, _, metrics = rule.step(net, params, state, batch)
    assert math.isfinite(float(metrics["loss"]))
    assert all(torch.isfinite(u).all() for u in updates["model"].values())
    assert "blocks.1.W" in rule.credit(net, params, state)["exact_gradient"]


@pytest.mark.parametrize("patterns", ["blocks.2.W", "blocks.1.W, blocks.9.*"])
def test_a_pattern_that_names_no_unreachable_parameter_is_refused(patterns):
    with pytest.raises(UserError, match=r"exact_gradient pattern '(blocks\.2\.W|blocks\.9\.\*)' names no parameter"
                                        r" that the feedback cannot reach \(those are blocks\.1\.W\)$"):
        _make("feedback_alignment", _matmul_net(), exact_gradient=patterns)


def test_an_opt_in_on_a_network_that_needs_none_is_refused():
    with pytest.raises(UserError, match=r"names no parameter .* \(this network has none\)$"):
        _make("kolen_pollack", zoo.mlp(SHAPE, (10,), depth=2, width=16), exact_gradient="*")


@pytest.mark.parametrize("shape, use, name", [
    ((16, 16), lambda x, W: torch.einsum("bi,oi->bo", x, W), "einsum"),
    ((16, 16), lambda x, W: F.embedding((x[:, :4] * 0).long(), W).flatten(1)[:, :16], "embedding"),
    ((1,), lambda x, W: F.prelu(x, W), "prelu"),
    ((16, 16), lambda x, W: F.linear(x, W.T), "T"),  # a view of the weight is another tensor
])
def test_other_uses_are_refused_naming_the_function(shape, use, name):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(*shape) / 4)

        def forward(self, x):
            return torch.tanh(use(x, self.W))

    with pytest.raises(UserError, match=rf"parameter 'blocks\.1\.W': it is used in .*{name}"):
        _make("sign_symmetry", _net(RawDense(64, 16), Other(), RawDense(16, 10, True)))


def test_biases_and_normalisations_train_by_their_exact_gradient_without_refusal():
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
            self.gamma, self.beta = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return torch.tanh(F.layer_norm(self.lin(x), (16,), self.gamma, self.beta))

    net, rule, params, state, _ = _make("feedback_alignment", _net(RawDense(64, 16), Normed(), RawDense(16, 10, True)))
    uses = parameter_uses(net, params["model"])
    assert uses["blocks.1.lin.weight"] == ("weight",) and uses["blocks.1.lin.bias"] == ("bias",)
    assert uses["blocks.1.gamma"] == uses["blocks.1.beta"] == ("norm",)
    assert rule.credit(net, params, state) == {
        "feedback": ["blocks.0.W", "blocks.1.lin.weight", "blocks.2.W"],
        "exact_gradient": ["blocks.0.b", "blocks.1.gamma", "blocks.1.beta", "blocks.1.lin.bias", "blocks.2.b"]}


@pytest.mark.parametrize("rule_name", LAYER_RULES)
def test_a_network_with_no_feedback_weight_is_refused_in_one_line(rule_name):
    with pytest.raises(UserError, match=rf"^rule '{rule_name}' reaches no layer of this network: [^\n]*$"):
        _make(rule_name, zoo.mlp(SHAPE, (10,), depth=0, width=16))


# -- the listing and the zoo ----------------------------------------------------------------------------
def test_credit_on_the_zoo_mlp_lists_the_sending_weights_as_feedback():
    net, rule, params, state, _ = _make("feedback_alignment", zoo.mlp(SHAPE, (10,), depth=2, width=16))
    assert rule.credit(net, params, state) == {
        "feedback": ["blocks.1.layer.weight", "blocks.2.layer.weight"],
        "exact_gradient": ["blocks.0.layer.weight", "blocks.0.layer.bias", "blocks.1.layer.bias",
                           "blocks.2.layer.bias"]}


def _old_feedback_weight_keys(network):
    """The keys as they were found before the forward-pass scan: by module type."""
    keys = []
    for i, block in enumerate(network.blocks):
        if isinstance(block, Block):
            if i > 0:
                keys.append(weight_key(i))
            continue
        keys += [f"blocks.{i}.{name}.weight" for name, m in block.named_modules() if isinstance(m, AFFINE_LAYERS)]
    return keys


@pytest.mark.parametrize("model, options", [("mlp", {"depth": 3, "width": 16}), ("lenet", {}), ("resnet20", {}),
                                            ("resnet", {"depth": 8, "shortcut": "B"}), ("vgg", {"width": 4})])
def test_feedback_weight_keys_are_unchanged_on_the_zoo(model, options):
    spec = get_registry().model(model)
    torch.manual_seed(0)
    net = spec.make(spec.example_shape, (10,), None, **options)
    old = _old_feedback_weight_keys(net)
    assert len(old) >= 3
    assert feedback_weight_keys(net, net.init_params()) == old
    assert feedback_weight_keys(net) == old
