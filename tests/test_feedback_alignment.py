"""The feedback-alignment family against independent, hand-written computations of its formulas."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Block, Network, UserError
from fa_rules import models as zoo
from fa_rules.core.feedback import chained_feedback_gradients, draw_feedback, weight_key
from fa_rules.core.metrics import angle_deg, backprop_gradient
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, check_updates, declared_weight_decay, make_optimizers
from fa_rules.plugins.manager import get_registry

RULES = ["feedback_alignment", "direct_feedback_alignment", "indirect_feedback_alignment", "sign_symmetry",
         "kolen_pollack"]


def _setup(rule_name, build, shape, n=12, seed=0, **options):
    torch.manual_seed(seed)
    net = build()
    x, y = torch.rand(n, *shape), torch.randint(0, 10, (n,))
    rule = get_registry().rule(rule_name).make(**options)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(seed + 1))
    return net, rule, params, state, Batch(x, y)


def _mlp():
    return zoo.mlp((1, 8, 8), (10,), depth=2, width=16)  # 3 blocks: 64-16-16-10, tanh


def _output_error(logits, y):
    """e = dJ/d(logits) for the mean cross-entropy, written out: (softmax - one-hot) / N."""
    return (torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).float()) / y.shape[0]


# -- 3-block MLP: the notes' formulas, written out ---------------------------------------------------
@pytest.mark.parametrize("rule_name", RULES)
def test_mlp_updates_equal_the_notes_formulas(rule_name):
    net, rule, params, state, batch = _setup(rule_name, _mlp, (1, 8, 8), decay=0.01) if rule_name == "kolen_pollack" \
        else _setup(rule_name, _mlp, (1, 8, 8))
    updates, _, metrics = rule.step(net, params, state, batch)
    p = params["model"]
    W1, b1, W2, b2, W3, b3 = (p[f"blocks.{i}.layer.{n}"] for i in range(3) for n in ("weight", "bias"))
    x = batch.x.flatten(1)
    a1 = x @ W1.T + b1
    h1 = torch.tanh(a1)
    a2 = h1 @ W2.T + b2
    h2 = torch.tanh(a2)
    a3 = h2 @ W3.T + b3
    e = _output_error(a3, batch.y)

    def fprime(a):
        return 1 - torch.tanh(a) ** 2

    if rule_name in ("feedback_alignment", "sign_symmetry", "kolen_pollack"):
        if rule_name == "feedback_alignment":
            B2, B3 = state["feedback"][weight_key(1)], state["feedback"][weight_key(2)]
        elif rule_name == "sign_symmetry":
            B2, B3 = (torch.sign(W) * W.abs().mean() for W in (W2, W3))
        else:
            B2, B3 = params["feedback"][weight_key(1)], params["feedback"][weight_key(2)]
        d2 = (e @ B3) * fprime(a2)  # delta_a2 = (B e) * f'(a2), B laid out like W3 (10 x 16)
        d1 = (d2 @ B2) * fprime(a1)
    elif rule_name == "direct_feedback_alignment":
        D1, D2 = state["projections"]["blocks.0"], state["projections"]["blocks.1"]
        d1 = (e @ D1.T) * fprime(a1)  # delta_a_l = (D_l e) * f'(a_l)
        d2 = (e @ D2.T) * fprime(a2)
    else:  # indirect: projected to the first hidden block, then forward through W2
        D1 = state["projections"]["blocks.0"]
        d1 = (e @ D1.T) * fprime(a1)
        d2 = (d1 @ W2.T) * fprime(a2)
    expected = {
        "blocks.0.layer.weight": d1.T @ x, "blocks.0.layer.bias": d1.sum(0),
        "blocks.1.layer.weight": d2.T @ h1, "blocks.1.layer.bias": d2.sum(0),
        "blocks.2.layer.weight": e.T @ h2, "blocks.2.layer.bias": e.sum(0),  # output block: true gradient
    }
    if rule_name == "kolen_pollack":
        # the decay terms are declared, and the engine adds them: pseudo-gradient = update + lambda p
        decay = declared_weight_decay(rule_name, rule, net, params)
        assert decay == {g: {weight_key(1): 0.01, weight_key(2): 0.01} for g in ("model", "feedback")}
        updates = {g: {k: u + decay.get(g, {}).get(k, 0.0) * params[g][k] for k, u in us.items()}
                   for g, us in updates.items()}
        fb = params["feedback"]
        assert set(updates["feedback"]) == {weight_key(1), weight_key(2)}
        for k, b in fb.items():
            assert torch.allclose(updates["feedback"][k], expected[k] + 0.01 * b, atol=1e-6), k
        for k in fb:
            expected[k] = expected[k] + 0.01 * p[k]
    assert set(updates["model"]) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(updates["model"][k], v, atol=1e-6), k
    assert abs(float(metrics["loss"]) - F.cross_entropy(a3, batch.y).item()) < 1e-6
    # the rule is not secretly backprop: its first hidden update points elsewhere
    reference = backprop_gradient(net, p, batch)
    assert angle_deg(updates["model"]["blocks.0.layer.weight"], reference["blocks.0.layer.weight"]) > 5


# -- conv path: lenet against explicit conv / transposed-conv / pooling code ---------------------
def _lenet():
    return zoo.lenet((1, 12, 12), (10,))  # conv-relu-pool x2, 144-120-84-10


class _Feedback(torch.autograd.Function):
    """y = layer(x; w, b) whose input gradient uses B instead of w (the classic FA layer)."""

    @staticmethod
    def forward(ctx, x, w, b, B, conv):
        ctx.save_for_backward(x, w, B)
        ctx.conv = conv
        return F.conv2d(x, w, b, padding=2) if conv else F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w, B = ctx.saved_tensors
        if ctx.conv:
            gx = torch.nn.grad.conv2d_input(x.shape, B, g, padding=2)
            gw = torch.nn.grad.conv2d_weight(x, w.shape, g, padding=2)
            return gx, gw, g.sum((0, 2, 3)), None, None
        return g @ B, g.T @ x, g.sum(0), None, None


def _lenet_reference_forward(p, x, feedback):
    """LeNet written with F.* calls; block i's input gradient goes through feedback[i]."""
    def layer(i, h, conv):
        w, b = p[f"blocks.{i}.layer.weight"], p[f"blocks.{i}.layer.bias"]
        return _Feedback.apply(h, w, b, feedback.get(i, w), conv)

    h = F.max_pool2d(F.relu(layer(0, x, True)), 2)
    h = F.max_pool2d(F.relu(layer(1, h, True)), 2)
    h = F.relu(layer(2, h.flatten(1), False))
    h = F.relu(layer(3, h, False))
    return layer(4, h, False)


def _leaf_params(p):
    return {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}


@pytest.mark.parametrize("rule_name", ["feedback_alignment", "sign_symmetry"])
def test_lenet_chained_feedback_matches_explicit_transposed_convolutions(rule_name):
    net, rule, params, state, batch = _setup(rule_name, _lenet, (1, 12, 12))
    updates, _, _ = rule.step(net, params, state, batch)
    p = _leaf_params(params["model"])
    if rule_name == "feedback_alignment":
        feedback = {i: state["feedback"][weight_key(i)] for i in range(1, 5)}
    else:
        weights = {i: p[weight_key(i)].detach() for i in range(1, 5)}
        feedback = {i: torch.sign(w) * w.abs().mean() for i, w in weights.items()}
    F.cross_entropy(_lenet_reference_forward(p, batch.x, feedback), batch.y).backward()
    for k, v in p.items():
        assert torch.allclose(updates["model"][k], v.grad, atol=1e-6), k


def test_feedback_equal_to_the_forward_weights_is_backprop_for_conv_nets():
    torch.manual_seed(0)
    net = zoo.lenet((1, 12, 12), (10,))
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    p = net.init_params()
    grads, loss = chained_feedback_gradients(net, p, x, y, {i: p[weight_key(i)] for i in range(1, 5)})
    F.cross_entropy(net(x), y).backward()
    for name, param in net.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6), name


def test_every_rule_runs_on_the_paper_encoder_with_strided_convolutions():
    torch.manual_seed(0)
    net = zoo.paper_encoder((1, 28, 28), (10,))  # stride-1/2 convs, leaky_relu, Linear(3136, 4096)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    p = net.init_params()
    grads, _ = chained_feedback_gradients(net, p, x, y, {i: p[weight_key(i)] for i in range(1, net.num_blocks)})
    reference = backprop_gradient(net, p, Batch(x, y))
    for k in p:
        assert torch.allclose(grads[k], reference[k], atol=1e-6), k
    for name in RULES:
        rule = get_registry().rule(name).make()
        params, state = rule.init(net, {"model": p}, torch.Generator().manual_seed(0))
        updates, _, _ = rule.step(net, params, state, Batch(x, y))
        check_updates(name, updates, params)
        assert all(torch.isfinite(u).all() for u in updates["model"].values()), name
        # hidden conv blocks get a nonzero signal that is not the gradient
        u, g = updates["model"]["blocks.1.layer.weight"], reference["blocks.1.layer.weight"]
        assert u.abs().sum() > 0 and 1 < angle_deg(u, g) < 179, name


def _lenet_pieces(p, x):
    """Per block: input, pre-activation, post-pool output and pooling indices (None for dense)."""
    pieces, h = [], x
    for i in range(4):
        w, b = p[f"blocks.{i}.layer.weight"], p[f"blocks.{i}.layer.bias"]
        conv = i < 2
        inp = h if conv else h.flatten(1)
        a = F.conv2d(inp, w, b, padding=2) if conv else F.linear(inp, w, b)
        idx = None
        if conv:
            h, idx = F.max_pool2d(F.relu(a), 2, return_indices=True)
        else:
            h = F.relu(a)
        pieces.append((inp, a, h, idx))
    logits = F.linear(h, p["blocks.4.layer.weight"], p["blocks.4.layer.bias"])
    return pieces, h, logits


def _layer_grads(i, inp, delta, out):
    if delta.dim() == 4:
        out[f"blocks.{i}.layer.weight"] = torch.nn.grad.conv2d_weight(inp, (delta.shape[1], inp.shape[1], 5, 5),
                                                                      delta, padding=2)
        out[f"blocks.{i}.layer.bias"] = delta.sum((0, 2, 3))
    else:
        out[f"blocks.{i}.layer.weight"] = delta.T @ inp
        out[f"blocks.{i}.layer.bias"] = delta.sum(0)


def _unpool(g, idx, like):
    return F.max_unpool2d(g, idx, 2, output_size=like.shape[-2:])


def _gather(delta, idx):
    return delta.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


@pytest.mark.parametrize("rule_name", ["direct_feedback_alignment", "indirect_feedback_alignment"])
def test_lenet_projected_feedback_matches_explicit_pooling_code(rule_name):
    net, rule, params, state, batch = _setup(rule_name, _lenet, (1, 12, 12))
    updates, _, _ = rule.step(net, params, state, batch)
    p = params["model"]
    pieces, h_last, logits = _lenet_pieces(p, batch.x)
    e = _output_error(logits, batch.y)
    D = state["projections"]
    expected = {"blocks.4.layer.weight": e.T @ h_last, "blocks.4.layer.bias": e.sum(0)}
    t = None
    for i, (inp, a, h, idx) in enumerate(pieces):
        if rule_name == "direct_feedback_alignment" or i == 0:
            g = (e @ D[f"blocks.{i}"].T).view_as(h)  # projected to the block's (pooled) output
            delta = (_unpool(g, idx, a) if idx is not None else g) * (a > 0)
        else:  # forward through the forward weights, no bias
            w = p[f"blocks.{i}.layer.weight"]
            u = F.conv2d(t, w, padding=2) if i < 2 else t.flatten(1) @ w.T
            delta = u * (a > 0)
        t = _gather(delta, idx) if idx is not None else delta  # the signal follows the pooling
        _layer_grads(i, inp, delta, expected)
    assert set(updates["model"]) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(updates["model"][k], v, atol=1e-6), k


# -- settings, determinism, learned feedback ---------------------------------------------------------
def test_feedback_settings_seed_scale_and_init():
    net = _mlp()
    params = {"model": net.init_params()}
    spec = get_registry().rule("feedback_alignment")

    def feedback(engine_seed, **options):
        _, state = spec.make(**options).init(net, params, torch.Generator().manual_seed(engine_seed))
        return state["feedback"][weight_key(1)]

    assert torch.equal(feedback(3), feedback(3)) and not torch.equal(feedback(3), feedback(4))
    # an own feedback seed makes the feedback independent of the run's generator
    assert torch.equal(feedback(3, feedback_seed=7), feedback(4, feedback_seed=7))
    assert torch.allclose(feedback(3, scale=2.5), 2.5 * feedback(3))
    bound = 1 / 16 ** 0.5  # uniform: the default Linear(16, 16) weight distribution
    b = feedback(3)
    assert b.abs().max() <= bound and b.abs().max() > 0.9 * bound
    g = draw_feedback((400, 100), "gaussian", 1.0, torch.Generator().manual_seed(0))
    assert abs(g.std().item() - 0.1) < 0.005
    with pytest.raises(UserError, match="option 'init' must be one of uniform, gaussian, xavier, got 'orthogonal'"):
        feedback(3, init="orthogonal")


def test_projections_have_the_block_output_shape_by_classes_for_conv_blocks():
    net, _, _, state, _ = _setup("dfa", _lenet, (1, 12, 12))
    shapes = {k: tuple(v.shape) for k, v in state["projections"].items()}
    assert shapes == {"blocks.0": (6 * 6 * 6, 10), "blocks.1": (16 * 3 * 3, 10), "blocks.2": (120, 10),
                      "blocks.3": (84, 10)}


def test_kolen_pollack_feedback_converges_to_the_forward_weights_under_sgd():
    lr, decay, steps = 0.1, 0.5, 10
    net, rule, params, state, batch = _setup("kolen_pollack", _mlp, (1, 8, 8), n=32, decay=decay)
    optimizers = make_optimizers(TrainConfig(optimizer="sgd", momentum=0.0, lr=lr), params)

    def gaps():
        return [(params["model"][k] - params["feedback"][k]).norm().item() for k in params["feedback"]]

    before = gaps()
    decay_terms = declared_weight_decay("kolen_pollack", rule, net, params)
    for _ in range(steps):
        updates, state, _ = rule.step(net, params, state, batch)
        apply_updates(rule, params, updates, optimizers, decay_terms)
    # W - B shrinks by exactly (1 - lr * decay) per step: the common update cancels
    for b, a in zip(before, gaps()):
        assert a == pytest.approx(b * (1 - lr * decay) ** steps, rel=1e-4)
    assert min(before) > 0.5


def test_networks_with_heads_are_refused_clearly():
    net = Network([Block(nn.Linear(4, 8), nn.Tanh())], {"mu": Block(nn.Linear(8, 2))}, in_shape=(4,))
    with pytest.raises(UserError, match="has heads"):
        get_registry().rule("ifa").make().init(net, {"model": net.init_params()}, torch.Generator())


# -- end to end --------------------------------------------------------------------------------------
def test_cli_trains_with_feedback_alignment_and_the_angle_to_backprop_falls_below_90(tmp_path, run_pictures):
    out = tmp_path / "run"
    args = ["train", "--rule", "feedback_alignment", "--dataset", "digits", "--epochs", "4", "--width", "64",
            "--lr", "0.003", "--opt", "feedback_seed=5", "--out", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["alignment_angle_deg"]) == 3 for r in rows)
    angles = summary["alignment_angle_deg"]
    assert angles == rows[-1]["alignment_angle_deg"]
    assert max(angles[:2]) < 85 and angles[2] < 1e-3  # hidden blocks align; the output block is exact
    assert rows[-1]["alignment_angle_deg"][1] < rows[0]["alignment_angle_deg"][1]  # and keep aligning
    assert json.loads((out / "config.json").read_text())["rule_options"] == {"feedback_seed": 5}
    assert (out / "alignment.png").stat().st_size > 1000


def test_cli_alias_and_rule_listing():
    result = CliRunner().invoke(app, ["rules", "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["name"]: r for r in json.loads(result.output)}
    for name in RULES:
        assert name in listed, name
    assert listed["kolen_pollack"]["options"]["decay"] == 1e-3
    assert get_registry().rule("dfa").name == "direct_feedback_alignment"
    assert get_registry().rule("ifa").name == "indirect_feedback_alignment"


def test_ifa_does_not_print_torchs_jit_script_deprecation():
    # torch's first forward-mode AD call imports decompositions that call the deprecated
    # torch.jit.script; the warning is torch's, so ifa's forward pass silences exactly it
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from fa_rules.core.feedback import _jvp\n"
        "print(_jvp(torch.sin, torch.zeros(3), torch.ones(3)).tolist())\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "jit.script" not in result.stderr, result.stderr
    assert result.stdout.strip() == "[1.0, 1.0, 1.0]"


@pytest.mark.parametrize("model", ["vgg", "lenet"])
def test_ifa_carries_the_signal_through_batch_norm_and_pooling_as_torch_func_does(model):
    # vgg's posts: batch norm (forward-mode AD under plain autograd) and batch norm + max pooling;
    # lenet's: max pooling alone (its forward indices); the torch.func path is the reference
    import copy

    from fa_rules.core.autodiff import functional_transforms

    torch.manual_seed(0)
    net = zoo.vgg((1, 8, 8), (10,), width=4) if model == "vgg" else zoo.lenet((1, 8, 8), (10,))
    rule = get_registry().rule("indirect_feedback_alignment").make()
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    batch = Batch(torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,)))
    plain, _, _ = rule.step(copy.deepcopy(net), params, state, batch)
    with functional_transforms():
        func, _, _ = rule.step(copy.deepcopy(net), params, state, batch)
    assert plain["model"].keys() == func["model"].keys()
    for k in plain["model"]:  # (batch norm amplifies the signal to hundreds: float32 rounding, relative)
        assert (plain["model"][k] - func["model"][k]).norm() <= 1e-5 * func["model"][k].norm() + 1e-7, k
    assert any(v.abs().sum() > 0 for k, v in plain["model"].items() if k.startswith("blocks.1."))


@pytest.mark.parametrize("activation", [nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.1), nn.Sigmoid(), nn.Identity(),
                                        nn.Softplus()])
def test_ifas_closed_forms_equal_autograd(activation):
    """IFA's shortcuts (a zoo activation's derivative, a layer's linear part, its weight gradient in
    closed form) give what forward- and reverse-mode AD give."""
    from fa_rules.core import feedback as fb
    from fa_rules.core.autodiff import load_forward_ad
    from fa_rules.core.network import Block, call_with

    load_forward_ad()  # (torch's first jvp warns about torch.jit.script; see that helper)
    torch.manual_seed(0)
    for layer, shape in ((nn.Linear(6, 5), (8, 6)), (nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 7, 7))):
        block = Block(layer, activation)
        local = {f"layer.{k}": v.detach().double() for k, v in layer.named_parameters()}
        layer.double()
        x = torch.randn(*shape, dtype=torch.float64)
        a = call_with(layer, fb._sub(local, "layer"), (x,))
        z = activation(a)
        d = torch.randn_like(a)
        expected = torch.func.jvp(activation, (a,), (d,))[1]
        assert torch.allclose(fb._activation_jvp(block, local, a, z, d), expected, atol=1e-12)
        zero_bias = {"weight": local["layer.weight"], "bias": torch.zeros_like(local["layer.bias"])}
        assert torch.allclose(fb._layer_without_bias(block, local, local["layer.weight"], x),
                              call_with(layer, zero_bias, (x,)), atol=1e-12)
        assert fb._has_closed_form_grads(layer)
        (grads,) = fb._closed_form_grads(block, local, x, d)
        _, pullback = torch.func.vjp(lambda p: call_with(layer, fb._sub(p, "layer"), (x,)), local)
        (reference,) = pullback(d)
        assert grads.keys() == reference.keys()
        for k in grads:
            assert torch.allclose(grads[k], reference[k], atol=1e-10), k
    assert not fb._has_closed_form_grads(nn.Conv2d(3, 4, 3, padding="same"))
    # the first block's transpose: the activation, then max pooling (overlapping windows included)
    for pool in (nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2), nn.Identity()):
        block = Block(nn.Conv2d(3, 4, 3), activation, pool)
        generic = isinstance(activation, nn.Softplus)  # not in the closed-form table: a vjp instead
        assert fb._has_closed_form_transpose(block) is not generic
        if generic:
            continue
        a = torch.randn(2, 4, 9, 9, dtype=torch.float64)
        z = activation(a)
        h, indices = fb._post_forward(block, {}, z)
        g = torch.randn_like(h)
        _, pullback = torch.func.vjp(lambda a_: pool(activation(a_)), a)
        (expected,) = pullback(g)
        (got,) = fb._closed_form_transpose(block, {}, a, z, indices, g)
        assert torch.allclose(got, expected, atol=1e-12), pool
    assert not fb._has_closed_form_transpose(Block(nn.Linear(3, 3), nn.Softplus()))
    assert not fb._has_closed_form_transpose(Block(nn.Linear(3, 3), nn.LeakyReLU(-0.5, inplace=True)))


def _chain_network(model):
    if model.startswith("mlp-"):
        return zoo.mlp((1, 8, 8), (10,), depth=3, width=24, activation=model[4:])
    if model == "lenet":
        return _lenet()
    return Network([  # strided and padded convolutions, overlapping pooling, no biases, a reshape
        Block(nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False), nn.LeakyReLU(0.2), nn.MaxPool2d(3, stride=1),
              in_shape=(1, 12, 12)),
        Block(nn.Conv2d(4, 5, 2), nn.Sigmoid()),
        Block(nn.Linear(45, 12, bias=False), nn.ReLU(), in_shape=(45,)),
        Block(nn.Linear(12, 10)),
    ], in_shape=(1, 12, 12), out_shape=(10,))


@pytest.mark.parametrize("model", ["mlp-tanh", "mlp-relu", "mlp-sigmoid", "mlp-leaky_relu", "mlp-identity", "lenet",
                                   "custom"])
def test_closed_form_chain_equals_the_graph_routes(model, monkeypatch):
    """The hand-written loop feedback alignment runs at the top level (no graph) gives the loss and
    gradients of the saved-tensor route, the autograd Functions and torch.func, routed weights and
    weights that send the signal through themselves (backprop) alike."""
    from fa_rules.core import feedback as fb
    from fa_rules.core.autodiff import functional_transforms

    torch.manual_seed(0)
    net = _chain_network(model)
    params = net.init_params()
    shape = (1, 12, 12) if model in ("lenet", "custom") else (1, 8, 8)
    x, y = torch.rand(6, *shape), torch.randint(0, 10, (6,))
    # block 1's weight sends the signal through itself; every later one through a random tensor
    feedback = {i: torch.randn_like(params[weight_key(i)]) for i in range(2, net.num_blocks)}
    assert fb._closed_form_chain_fits(net, {weight_key(i): b for i, b in feedback.items()})
    taken, original = [], fb._closed_form_chain
    monkeypatch.setattr(fb, "_closed_form_chain", lambda *args: taken.append(1) or original(*args))
    closed = chained_feedback_gradients(net, params, x, y, feedback)
    assert taken  # (the loop ran, not a graph route)
    monkeypatch.undo()
    monkeypatch.setattr(fb, "closed_form_allowed", lambda: False)
    hooked = chained_feedback_gradients(net, params, x, y, feedback)
    monkeypatch.setattr(fb, "first_order", lambda: False)
    functions = chained_feedback_gradients(net, params, x, y, feedback)
    with functional_transforms():
        transformed = chained_feedback_gradients(net, params, x, y, feedback)
    for name, (grads, loss) in {"hooks": hooked, "functions": functions, "torch.func": transformed}.items():
        assert closed[0].keys() == grads.keys(), name
        torch.testing.assert_close(closed[1], loss, msg=name)
        for k in grads:
            torch.testing.assert_close(closed[0][k], grads[k], msg=f"{name} {k}")
    backprop = chained_feedback_gradients(net, params, x, y, {})[0]
    assert not torch.allclose(closed[0][weight_key(0)], backprop[weight_key(0)])


@pytest.mark.parametrize("rule_name", ["direct_feedback_alignment", "direct_random_target_projection"])
@pytest.mark.parametrize("model,projection", [("mlp-tanh", "dense"), ("mlp-relu", "dense"), ("lenet", "dense"),
                                              ("lenet", "conv"), ("custom", "dense")])
def test_projected_signals_by_the_closed_form_loop_equal_their_graph_routes(rule_name, model, projection, monkeypatch):
    """DFA and DRTP without a graph (each block run, then its transpose and true gradients for its
    own projected error or target) give the loss, gradients (and DFA's block outputs) of their
    `vjp` routes, under plain autograd and torch.func."""
    from fa_rules.core import feedback as fb
    from fa_rules.core.autodiff import functional_transforms

    torch.manual_seed(0)
    net = _chain_network(model)
    params = net.init_params()
    shape = (1, 12, 12) if model in ("lenet", "custom") else (1, 8, 8)
    x, y = torch.rand(6, *shape), torch.randint(0, 10, (6,))
    rule = get_registry().rule(rule_name).make(projection=projection)
    _, state = rule.init(net, {"model": params}, torch.Generator().manual_seed(1))
    projections = {int(k.split(".")[1]): d for k, d in state["projections"].items()}
    assert projection == "dense" or any(d.dim() == 4 for d in projections.values())

    def run():
        if rule_name == "direct_random_target_projection":
            return (*fb.target_projection_gradients(net, params, x, y, projections), [])
        outputs = []
        grads, loss = fb.direct_feedback_gradients(net, params, x, y, projections, outputs)
        assert len(outputs) == net.num_blocks
        return grads, loss, outputs

    taken, original = [], fb._closed_form_block_forward
    monkeypatch.setattr(fb, "_closed_form_block_forward", lambda *args: taken.append(1) or original(*args))
    closed = run()
    assert len(taken) == net.num_blocks
    monkeypatch.undo()
    monkeypatch.setattr(fb, "closed_form_allowed", lambda: False)
    graph = run()
    with functional_transforms():
        transformed = run()
    for name, (grads, loss, outputs) in {"vjp": graph, "torch.func": transformed}.items():
        assert closed[0].keys() == grads.keys(), name
        torch.testing.assert_close(closed[1], loss, msg=name)
        for k in grads:
            torch.testing.assert_close(closed[0][k], grads[k], msg=f"{name} {k}")
        for a, b in zip(closed[2], outputs, strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_closed_form_chain_serves_only_networks_it_can_write_out():
    from fa_rules.core import feedback as fb

    vgg = zoo.vgg((1, 8, 8), (10,), width=4)  # batch norm in its posts
    assert not fb._closed_form_chain_fits(vgg, {weight_key(1): torch.zeros(1)})
    mlp = zoo.mlp((1, 8, 8), (10,), depth=2, width=8, activation="asinh")  # no closed-form derivative
    assert not fb._closed_form_chain_fits(mlp, {weight_key(1): torch.zeros(1)})
    mlp = _mlp()
    assert fb._closed_form_chain_fits(mlp, {weight_key(1): torch.zeros(1)})
    assert not fb._closed_form_chain_fits(mlp, {"blocks.1.layer.bias": torch.zeros(1)})  # not a layer weight


def test_kolen_pollack_with_declared_decay_trains_as_the_rule_adding_it_itself():
    """The engine adding Kolen-Pollack's decay in its Adam kernel gives the parameters of the rule
    returning `g + decay W` and `g + decay B` itself (its form before the decay was declared)."""
    from fa_rules.core import Rule

    decay = 0.05
    net, rule, params, state, _ = _setup("kolen_pollack", _mlp, (1, 8, 8), n=32, decay=decay)
    twin = {g: {k: v.clone() for k, v in ts.items()} for g, ts in params.items()}

    def step_adding_decay(network, params, state, batch):
        updates, state, metrics = rule.step(network, params, state, batch)
        full = {g: {k: u + decay * params[g][k] if k in params["feedback"] else u for k, u in us.items()}
                for g, us in updates.items()}
        return full, state, metrics

    itself = Rule(init=rule.init, step=step_adding_decay)
    config = TrainConfig(lr=1e-2)
    optimizers, twin_optimizers = make_optimizers(config, params), make_optimizers(config, twin)
    declared = declared_weight_decay("kolen_pollack", rule, net, params)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        batch = Batch(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
        updates, _, _ = rule.step(net, params, state, batch)
        assert updates["feedback"][weight_key(1)] is updates["model"][weight_key(1)]  # one shared tensor
        apply_updates(rule, params, updates, optimizers, declared)
        updates, _, _ = itself.step(net, twin, state, batch)
        apply_updates(itself, twin, updates, twin_optimizers)
    for group in params:
        for k in params[group]:
            assert torch.allclose(params[group][k], twin[group][k], rtol=1e-5, atol=1e-7), (group, k)
    moved = (params["feedback"][weight_key(1)] - _setup("kolen_pollack", _mlp, (1, 8, 8), n=32)[2]["feedback"][weight_key(1)])
    assert moved.abs().max() > 1e-3  # the feedback did learn


def test_the_memory_probe_sees_what_ifa_and_fa_keep_for_their_backward_pass():
    """Under the probe the closed forms stay off, so IFA's and FA's figures are what their graph
    routes save (IFA's closed-form layers save nothing, and once read as 0 x backprop's peak)."""
    from fa_rules.core.autodiff import SavedTensorsProbe

    net = _lenet()
    peaks = {}
    for rule_name in ("backprop", "indirect_feedback_alignment", "feedback_alignment"):
        _, rule, params, state, batch = _setup(rule_name, lambda: net, (1, 12, 12), n=16)
        with SavedTensorsProbe() as probe:
            rule.step(net, params, state, batch)
        peaks[rule_name] = probe.peak
    assert 0.4 < peaks["indirect_feedback_alignment"] / peaks["backprop"] < 0.9, peaks
    assert peaks["feedback_alignment"] == peaks["backprop"], peaks
