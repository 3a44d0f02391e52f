"""Feedback-alignment family, part 2 (learned and structured feedback), against independent
plain-autograd computations written from the papers' equations."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules import models as zoo
from fa_rules.core.autodiff import SavedTensorsProbe
from fa_rules.core.errors import UserError
from fa_rules.core.feedback import draw_feedback, weight_key
from fa_rules.core.metrics import angle_deg
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, check_updates, make_optimizers
from fa_rules.plugins.manager import get_registry
from fa_rules.testing import assert_conformant

NEW_RULES = ["bidirectional_fa", "bidirectional_dfa", "weight_mirror", "brsf", "frsf",
             "direct_random_target_projection"]


def _setup(rule_name, n=12, seed=0, build=None, shape=(1, 8, 8), **options):
    """A float64 network, rule, params, state and batch."""
    torch.manual_seed(seed)
    net = (build or (lambda: zoo.mlp((1, 8, 8), (10,), depth=2, width=16)))().double()
    x, y = torch.rand(n, *shape, dtype=torch.float64), torch.randint(0, 10, (n,))
    rule = get_registry().rule(rule_name).make(**options)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(seed + 1))
    return net, rule, params, state, Batch(x, y, seed=77)


def _output_error(logits, y):
    return (torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).double()) / y.shape[0]


def _forward(p, x):
    W1, b1, W2, b2, W3, b3 = (p[f"blocks.{i}.layer.{n}"] for i in range(3) for n in ("weight", "bias"))
    x = x.flatten(1)
    a1 = x @ W1.T + b1
    h1 = torch.tanh(a1)
    a2 = h1 @ W2.T + b2
    h2 = torch.tanh(a2)
    a3 = h2 @ W3.T + b3
    return x, (W1, W2, W3), (a1, h1, a2, h2, a3)


def _fprime(a):
    return 1 - torch.tanh(a) ** 2


def _updates(x, h1, h2, e, d1, d2):
    return {"blocks.0.layer.weight": d1.T @ x, "blocks.0.layer.bias": d1.sum(0),
            "blocks.1.layer.weight": d2.T @ h1, "blocks.1.layer.bias": d2.sum(0),
            "blocks.2.layer.weight": e.T @ h2, "blocks.2.layer.bias": e.sum(0)}


def _assert_close(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(actual[k], v, rtol=1e-9, atol=1e-12), k


# -- the papers' equations, on a 3-block tanh MLP, float64 ---------------------------------------------
@pytest.mark.parametrize("rule_name", ["brsf", "frsf"])
def test_random_magnitude_sign_feedback_matches_moskovitz_et_al(rule_name):
    net, rule, params, state, batch = _setup(rule_name)
    updates, _, _ = rule.step(net, params, state, batch)
    x, (W1, W2, W3), (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    e = _output_error(a3, batch.y)
    if rule_name == "frsf":
        M2, M3 = state["magnitudes"][weight_key(1)], state["magnitudes"][weight_key(2)]
        assert (M2 >= 0).all() and (M3 >= 0).all()
    else:  # brSF: magnitudes drawn from the step's generator, blocks in order
        g = torch.Generator().manual_seed(batch.seed)
        M2, M3 = (draw_feedback(W.shape, "uniform", 1.0, g).double().abs() for W in (W2, W3))
    B2, B3 = M2 * torch.sign(W2), M3 * torch.sign(W3)  # B = |R| o sign(W)
    d2 = (e @ B3) * _fprime(a2)
    d1 = (d2 @ B2) * _fprime(a1)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))
    # brSF draws new magnitudes every batch, frSF keeps its own
    other, _, _ = rule.step(net, params, state, Batch(batch.x, batch.y, seed=78))
    same = torch.equal(other["model"]["blocks.0.layer.weight"], updates["model"]["blocks.0.layer.weight"])
    assert same == (rule_name == "frsf")


def test_sign_symmetry_paper_magnitude_is_the_bare_sign():
    # Liao et al.'s uSF: B = sign(W), times `scale`
    for scale in (1.0, 2.0):
        net, rule, params, state, batch = _setup("sign_symmetry", magnitude="unit", scale=scale)
        updates, _, _ = rule.step(net, params, state, batch)
        x, (W1, W2, W3), (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
        e = _output_error(a3, batch.y)
        d2 = (e @ (scale * torch.sign(W3))) * _fprime(a2)
        d1 = (d2 @ (scale * torch.sign(W2))) * _fprime(a1)
        _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))


def test_sign_symmetry_biotorch_magnitude_is_a_xavier_constant():
    net, rule, params, state, batch = _setup("sign_symmetry", magnitude="xavier", scale=2.0)
    updates, _, _ = rule.step(net, params, state, batch)
    x, (W1, W2, W3), (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    e = _output_error(a3, batch.y)
    B2 = 2.0 * (2 / (16 + 16)) ** 0.5 * torch.sign(W2)  # fan_in 16, fan_out 16
    B3 = 2.0 * (2 / (16 + 10)) ** 0.5 * torch.sign(W3)
    d2 = (e @ B3) * _fprime(a2)
    d1 = (d2 @ B2) * _fprime(a1)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))


def test_drtp_projects_the_one_hot_target_not_the_error():
    net, rule, params, state, batch = _setup("drtp")
    updates, _, metrics = rule.step(net, params, state, batch)
    x, _, (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    e = _output_error(a3, batch.y)
    target = F.one_hot(batch.y, 10).double()
    D1, D2 = state["projections"]["blocks.0"], state["projections"]["blocks.1"]
    d1 = (target @ D1.T) * _fprime(a1)  # delta_a_l = (B_l y*) * f'(a_l), Frenkel et al. Eq. 6-7
    d2 = (target @ D2.T) * _fprime(a2)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))
    assert float(metrics["loss"]) == pytest.approx(F.cross_entropy(a3, batch.y).item(), rel=1e-12)


class _ReverseLayer(torch.autograd.Function):
    """r = g B (a reverse layer with B laid out like W) whose input gradient goes through W."""

    @staticmethod
    def forward(ctx, g, B, W):
        ctx.save_for_backward(g, W)
        return g @ B

    @staticmethod
    def backward(ctx, delta):
        g, W = ctx.saved_tensors
        return delta @ W.T, g.T @ delta, None


def test_bidirectional_fa_matches_luo_fu_glass_forward_and_reverse_phases():
    net, rule, params, state, batch = _setup("bidirectional_fa")
    updates, _, metrics = rule.step(net, params, state, batch)
    x, (W1, W2, W3), (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    fb = params["feedback"]
    B1, B2, B3 = (fb[weight_key(i)] for i in range(3))
    e = _output_error(a3, batch.y)
    d2 = (e @ B3) * _fprime(a2)  # Eq. 18-19 with learned B
    d1 = (d2 @ B2) * _fprime(a1)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))
    # reverse network y* -> x^ (Eq. 23-25), trained on 0.5|x^ - x|^2 by FA through W (Eq. 26-29)
    Bs = {i: B.detach().clone().requires_grad_(True) for i, B in enumerate((B1, B2, B3))}
    g2 = torch.tanh(_ReverseLayer.apply(F.one_hot(batch.y, 10).double(), Bs[2], W3))
    g1 = torch.tanh(_ReverseLayer.apply(g2, Bs[1], W2))
    x_hat = _ReverseLayer.apply(g1, Bs[0], W1)
    reverse_loss = 0.5 * ((x_hat - x) ** 2).sum() / x.shape[0]
    reverse_loss.backward()
    _assert_close(updates["feedback"], {weight_key(i): Bs[i].grad for i in range(3)})
    assert float(metrics["reverse_loss"]) == pytest.approx(reverse_loss.item(), rel=1e-12)


@pytest.mark.parametrize("form", ["dot", "elementwise"])
def test_bidirectional_dfa_matches_luo_fu_glass(form):
    net, rule, params, state, batch = _setup("bidirectional_dfa", feedback_loss=form)
    updates, _, metrics = rule.step(net, params, state, batch)
    x, _, (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    e = _output_error(a3, batch.y)
    D1, D2 = params["feedback"]["blocks.0"], params["feedback"]["blocks.1"]
    d1 = (e @ D1.T) * _fprime(a1)  # Eq. 36-37 with learned projections
    d2 = (e @ D2.T) * _fprime(a2)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))
    target = F.one_hot(batch.y, 10).double()
    Ds = [D.detach().clone().requires_grad_(True) for D in (D1, D2)]
    losses = []
    for D, h in zip(Ds, (h1, h2)):
        predicted = target @ D.T  # <- a_i = <- w_i y (Eq. 39)
        if form == "dot":  # Eq. 40-41: 1 - sigmoid(<-a_i . h_i), mean over the batch
            losses.append((1 - torch.sigmoid((predicted * h).sum(1))).mean())
        else:
            losses.append((1 - torch.sigmoid(predicted * h)).sum(1).mean())
    sum(losses).backward()
    _assert_close(updates["feedback"], {"blocks.0": Ds[0].grad, "blocks.1": Ds[1].grad})
    assert float(metrics["feedback_loss"]) == pytest.approx(sum(losses).item() / 2, rel=1e-12)


@pytest.mark.parametrize("response", ["linear", "forward"])
def test_weight_mirror_matches_akrout_et_al_eq_7_and_9(response):
    net, rule, params, state, batch = _setup("weight_mirror", noise_std=0.5, decay=0.3, response=response,
                                             mirror_batch=5)
    updates, _, _ = rule.step(net, params, state, batch)
    x, (W1, W2, W3), (a1, h1, a2, h2, a3) = _forward(params["model"], batch.x)
    fb = params["feedback"]
    B2, B3 = fb[weight_key(1)], fb[weight_key(2)]
    e = _output_error(a3, batch.y)
    d2 = (e @ B3) * _fprime(a2)
    d1 = (d2 @ B2) * _fprime(a1)
    _assert_close(updates["model"], _updates(x, h1, h2, e, d1, d2))
    # mirror phase: each layer driven by its own noise, blocks in order, from the step's generator
    g = torch.Generator().manual_seed(batch.seed)
    xi2, xi3 = (0.5 * torch.randn((5, 16), generator=g).double() for _ in range(2))
    p = params["model"]
    expected = {}
    for key, xi, W, b, B in ((weight_key(1), xi2, W2, p["blocks.1.layer.bias"], B2),
                             (weight_key(2), xi3, W3, p["blocks.2.layer.bias"], B3)):
        r = xi @ W.T if response == "linear" else (torch.tanh(xi @ W.T + b) if key == weight_key(1) else xi @ W.T + b)
        # Eq. 9: dB = eta (xi r^T) - lambda B; our B is laid out like W, the update is descended
        expected[key] = 0.3 * B - r.T @ xi / 5
    _assert_close(updates["feedback"], expected)


# -- structured conv projection (BioTorch's DFA conv feedback) -----------------------------------------
def _lenet():
    return zoo.lenet((1, 12, 12), (10,))


@pytest.mark.parametrize("rule_name", ["direct_feedback_alignment", "direct_random_target_projection"])
def test_conv_projection_is_the_transposed_convolution_of_the_broadcast_signal(rule_name):
    net, rule, params, state, batch = _setup(rule_name, build=_lenet, shape=(1, 12, 12), projection="conv")
    D = state["projections"]
    assert tuple(D["blocks.0"].shape) == (10, 6, 5, 5)  # classes x block-0 channels x next kernel
    assert tuple(D["blocks.1"].shape) == (16 * 3 * 3, 10)  # next layer is Linear: dense
    updates, _, _ = rule.step(net, params, state, batch)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params["model"].items()}
    a0 = F.conv2d(batch.x, p["blocks.0.layer.weight"], p["blocks.0.layer.bias"], padding=2)
    h0 = F.max_pool2d(F.relu(a0), 2)
    a1 = F.conv2d(h0.detach(), p["blocks.1.layer.weight"], p["blocks.1.layer.bias"], padding=2)
    h1 = F.max_pool2d(F.relu(a1), 2)
    h2 = F.relu(F.linear(h1.detach().flatten(1), p["blocks.2.layer.weight"], p["blocks.2.layer.bias"]))
    h3 = F.relu(F.linear(h2.detach(), p["blocks.3.layer.weight"], p["blocks.3.layer.bias"]))
    logits = F.linear(h3.detach(), p["blocks.4.layer.weight"], p["blocks.4.layer.bias"])
    e = _output_error(logits.detach(), batch.y)
    signal = e if rule_name == "direct_feedback_alignment" else F.one_hot(batch.y, 10).double()
    # block 0's output receives d/dh0 <signal broadcast over conv2's 6x6 outputs, conv2d(h0; K, pad 2)>
    probe = h0.detach().clone().requires_grad_(True)
    tiled = signal[:, :, None, None].expand(-1, -1, 6, 6)
    (g0,) = torch.autograd.grad((F.conv2d(probe, D["blocks.0"], padding=2) * tiled).sum(), probe)
    torch.autograd.backward([h0, h1, h2, h3, logits],
                            [g0, (signal @ D["blocks.1"].T).view_as(h1), signal @ D["blocks.2"].T,
                             signal @ D["blocks.3"].T, e])
    _assert_close(updates["model"], {k: v.grad for k, v in p.items()})


def test_every_new_rule_runs_on_lenet_with_finite_updates():
    for name in NEW_RULES:
        net, rule, params, state, batch = _setup(name, n=4, build=_lenet, shape=(1, 12, 12))
        updates, _, metrics = rule.step(net, params, state, batch)
        check_updates(name, updates, params)
        assert all(torch.isfinite(u).all() for g in updates.values() for u in g.values()), name
        assert updates["model"]["blocks.0.layer.weight"].abs().sum() > 0, name
        assert torch.isfinite(torch.as_tensor(metrics["loss"])), name


# -- conformance, memory, learning ---------------------------------------------------------------------
@pytest.mark.parametrize("rule_name", NEW_RULES)
def test_new_rules_are_conformant(rule_name):
    assert_conformant(rule_name)


def test_drtp_step_builds_no_backward_graph_across_blocks():
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (10,), depth=6, width=256)
    x, y = torch.rand(256, 1, 8, 8), torch.randint(0, 10, (256,))
    peaks = {}
    for name in ("direct_feedback_alignment", "direct_random_target_projection"):
        rule = get_registry().rule(name).make()
        params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
        with SavedTensorsProbe() as probe:
            rule.step(net, params, state, Batch(x, y))
        peaks[name] = probe.peak
    one_block = 256 * 256 * 4 * 2  # a block's input (its output is the next one's) and its weight
    assert peaks["direct_random_target_projection"] <= 2 * one_block
    assert peaks["direct_random_target_projection"] < 0.4 * peaks["direct_feedback_alignment"]


def _train(name, steps, n=256, **options):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target[:n])
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (10,), depth=2, width=32)
    rule = get_registry().rule(name).make(**options)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    optimizers = make_optimizers(TrainConfig(lr=3e-3), params)
    snapshots = [{g: {k: v.clone() for k, v in t.items()} for g, t in params.items()}]
    for i in range(steps):
        batch = Batch(x[(i * 64) % n:(i * 64) % n + 64], y[(i * 64) % n:(i * 64) % n + 64], seed=i)
        updates, state, _ = rule.step(net, params, state, batch)
        apply_updates(rule, params, updates, optimizers)
    snapshots.append(params)
    return snapshots


@pytest.mark.parametrize("rule_name", ["bidirectional_fa", "weight_mirror"])
def test_learned_feedback_comes_to_align_with_the_forward_weights(rule_name):
    before, after = _train(rule_name, 150)
    for i in (1, 2):
        k = weight_key(i)
        start, end = (angle_deg(p["feedback"][k], p["model"][k]) for p in (before, after))
        assert start > 80 and end < start - 15, (k, start, end)


def test_bidirectional_dfa_projection_comes_to_align_with_the_output_weights():
    before, after = _train("bidirectional_dfa", 150)
    # D of the last hidden block stands where backprop has W_out^T (units x classes)
    start, end = (angle_deg(p["feedback"]["blocks.1"], p["model"][weight_key(2)].T) for p in (before, after))
    assert start > 75 and end < start - 15, (start, end)


@pytest.mark.parametrize("rule_name", NEW_RULES)
def test_cli_trains_each_new_rule_on_digits(tmp_path, rule_name):
    out = tmp_path / "run"
    # DRTP's target-only signal learns slowest: its full default run (20 epochs) reaches 0.94
    epochs = "20" if rule_name == "direct_random_target_projection" else "3"
    args = ["train", "--rule", rule_name, "--dataset", "digits", "--epochs", epochs, "--out", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85
    assert len(summary["alignment_angle_deg"]) == 3


def test_rule_listing_and_new_settings():
    result = CliRunner().invoke(app, ["rules", "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["name"]: r for r in json.loads(result.output)}
    for name in NEW_RULES:
        assert name in listed, name
    assert listed["sign_symmetry"]["options"]["magnitude"] == "mean_abs"
    assert listed["direct_feedback_alignment"]["options"]["projection"] == "dense"
    assert listed["weight_mirror"]["options"]["decay"] == 1.0
    assert get_registry().rule("drtp").name == "direct_random_target_projection"
    for name, option in (("sign_symmetry", {"magnitude": "median"}), ("dfa", {"projection": "sparse"}),
                         ("bidirectional_dfa", {"feedback_loss": "mse"})):
        with pytest.raises(UserError, match=f"option '{next(iter(option))}' must be one of"):
            _setup(name, **option)
