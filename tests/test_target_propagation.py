"""target_prop, dtp and iterative_dtp against independent references (tiny nets, exact inverses)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Batch, Network, UserError
from fa_rules.core.inverse import decoder_for, encode, forward_values
from fa_rules.core.network import Block
from fa_rules.core.trainer import TrainConfig
from fa_rules.runs import resolve
from fa_rules.plugins.manager import get_registry
from fa_rules.rules import target_propagation as tp

RULES = ("target_prop", "dtp", "iterative_dtp")


def _linear_chain(widths, activations, seed=0, bias=True):
    torch.manual_seed(seed)
    blocks = [
        Block(nn.Linear(a, b, bias=bias), act, in_shape=(a,) if i == 0 else None)
        for i, (a, b, act) in enumerate(zip(widths[:-1], widths[1:], activations))
    ]
    return Network(blocks, in_shape=(widths[0],), family="mlp")


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def _settings(**overrides):
    base = dict(beta=0.5, space="post", feedback_lr=1.0, feedback_iters=1, feedback_noise=0.0,
                feedback_objective="autoencoder", feedback_normalise=True)
    return tp.Settings(**{**base, **overrides}).check()


def _exact_inverse_feedback(network, model, offset=0.0):
    """Decoders g_l = f_l^{-1} for linear blocks with identity activations (+ a constant error)."""
    feedback = {}
    for i in range(1, network.num_blocks):
        w, b = model[f"blocks.{i}.layer.weight"], model[f"blocks.{i}.layer.bias"]
        inv = torch.linalg.inv(w.double()).float()
        feedback[str(i)] = {"weight": inv, "bias": -(inv @ b) + offset}
    return feedback


@pytest.fixture(scope="module")
def invertible():
    """Three square linear blocks (identity activations), a batch, and its reference targets."""
    net = _linear_chain([4, 4, 4, 4], [nn.Identity(), nn.Identity(), nn.Identity()], seed=3)
    model = net.init_params()
    for i in range(3):  # well-conditioned weights keep the float32 comparison tight
        model[f"blocks.{i}.layer.weight"] = _orthogonal(4, i) * 1.5
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 1])
    beta = 0.5
    hs = [x]
    for i in range(3):
        hs.append(hs[-1] @ model[f"blocks.{i}.layer.weight"].T + model[f"blocks.{i}.layer.bias"])
    # independent reference: the output target, pulled back through the exact inverses
    tau = [None, None, None, hs[3] - beta * (F.softmax(hs[3], dim=1) - F.one_hot(y, 4).float())]
    for i in (2, 1):
        w, b = model[f"blocks.{i}.layer.weight"], model[f"blocks.{i}.layer.bias"]
        tau[i] = torch.linalg.solve(w, (tau[i + 1] - b).T).T
    return net, model, x, y, beta, hs, tau


# -- decoders ---------------------------------------------------------------------------------------
def test_decoders_mirror_the_block_types():
    net = get_registry().model("mlp").make((1, 8, 8), (10,), depth=2, width=16)
    dec = decoder_for(net, 1, "post")
    assert dec.kind == "linear" and dec.weight_shape == (16, 16) and isinstance(dec.out_activation, nn.Tanh)
    top = decoder_for(net, 2, "pre")
    assert top.weight_shape == (16, 10) and isinstance(top.in_activation, nn.Identity)
    first = decoder_for(net, 0, "post")  # the input block's decoder restores the image shape
    params = first.init(torch.Generator().manual_seed(0))
    assert first(params, torch.zeros(3, 16)).shape == (3, 1, 8, 8)

    conv = Network([Block(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Tanh()),
                    Block(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh())], in_shape=(1, 8, 8))
    dec = decoder_for(conv, 1, "post")
    assert dec.kind == "conv_transpose" and dec.weight_shape == (6, 4, 3, 3) and dec.output_padding == (1, 1)
    h = conv.blocks[1](conv.blocks[0](torch.zeros(2, 1, 8, 8)))
    assert dec(dec.init(torch.Generator().manual_seed(0)), h).shape == (2, 4, 4, 4)

    pooled = Network([Block(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)),
                      Block(nn.Linear(64, 10), in_shape=(64,))], in_shape=(1, 8, 8))
    dense = decoder_for(pooled, 1, "post")  # a pooled conv output is a dense block's input: reshaped back
    h = pooled.blocks[1](pooled.blocks[0](torch.zeros(2, 1, 8, 8)))
    assert dense(dense.init(torch.Generator().manual_seed(0)), h).shape == (2, 4, 4, 4)


# -- targets with exact inverses --------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_with_exact_inverses_every_rule_propagates_the_exact_inverse_targets(invertible, rule):
    net, model, x, y, beta, hs, tau = invertible
    s = {"target_prop": _settings(output_init="decoder"), "dtp": _settings(),
         "iterative_dtp": _settings(input_iters=2, output_iters=3)}[rule]
    values = forward_values(net, model, x, "post")
    targets = tp.compute_targets(net, model, _exact_inverse_feedback(net, model), values, y, s)
    for i in (1, 2, 3):
        assert torch.allclose(targets[i], tau[i], atol=1e-5), i
    assert (targets[1] - values[1]).abs().max() > 1e-2  # the targets do move


def test_the_difference_correction_removes_a_constant_decoder_error(invertible):
    net, model, x, y, beta, hs, tau = invertible
    values = forward_values(net, model, x, "post")
    offset = torch.tensor([0.3, -0.2, 0.1, 0.5])
    wrong = _exact_inverse_feedback(net, model, offset=offset)
    plain = tp.compute_targets(net, model, wrong, values, y, _settings(output_init="decoder"))
    diff = tp.compute_targets(net, model, wrong, values, y, _settings())
    assert torch.allclose(plain[2], tau[2] + offset, atol=1e-5)  # target_prop inherits the error
    for i in (1, 2):
        assert torch.allclose(diff[i], tau[i], atol=1e-5), i  # dtp does not
    # one decoder-input correction (sec. 5) finds u with f(g(u)) = tau: exact from either start
    for init in ("decoder", "difference"):
        corrected = tp.compute_targets(net, model, wrong, values, y, _settings(output_init=init, input_iters=1))
        for i in (1, 2):
            assert torch.allclose(corrected[i], tau[i], atol=1e-4), (init, i)


def test_evaluate_reports_zero_inversion_error_for_exact_inverses(invertible):
    net, model, x, y, beta, hs, tau = invertible
    rule = get_registry().rule("dtp").make(feedback_iters=0, first_target="output")  # every block has a decoder
    state = {"feedback": _exact_inverse_feedback(net, model)}
    out = rule.evaluate(net, {"model": model}, state, Batch(x, y))
    assert len(out["feedback_recon_error"]) == 2 and max(out["feedback_recon_error"]) < 1e-10
    assert max(out["feedback_reverse_error"]) < 1e-10 and max(out["target_inversion_error"]) < 1e-4
    state = {"feedback": _exact_inverse_feedback(net, model, offset=0.1)}
    out = rule.evaluate(net, {"model": model}, state, Batch(x, y))
    assert min(out["feedback_recon_error"]) == pytest.approx(0.01, rel=1e-3)


# -- the iterative corrections converge geometrically -----------------------------------------------
def _contracting_block(slope=0.7, n=6):
    """Block 1 is f(z) = leaky(Q z + b) with Q orthogonal; g(h) = Q^T h - Q^T b is exact for the
    linear part only, so g o f - I and f o g - I have Lipschitz constant 1 - slope < 1."""
    net = _linear_chain([n, n, n], [nn.Identity(), nn.LeakyReLU(slope)], seed=5)
    model = net.init_params()
    q = _orthogonal(n, 11)
    model["blocks.1.layer.weight"] = q
    b = model["blocks.1.layer.bias"]
    feedback = {"1": {"weight": q.T.clone(), "bias": -(q.T @ b)}}

    def f_inverse(t):  # rows are examples
        return (torch.where(t >= 0, t, t / slope) - b) @ q

    return net, model, feedback, f_inverse, 1 - slope


@pytest.mark.parametrize("kind", ["output", "input"])
def test_the_iterative_inverse_error_shrinks_geometrically_when_the_autoencoder_is_contracting(kind):
    net, model, feedback, f_inverse, alpha = _contracting_block()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    values = forward_values(net, model, x, "post")
    tau = values[2] + 0.5 * torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    dec = tp.decoders(net, "post")[1]
    reference = f_inverse(tau)
    errors = []
    for t in range(7):
        iters = {"output_iters": t} if kind == "output" else {"input_iters": t}
        s = _settings(output_init="decoder", **iters)
        target = tp.carry_down(net, model, 1, dec, feedback["1"], tau, values, s)
        errors.append(float((target - reference).norm()))
    assert errors[0] > 0.5  # the plain decoder output is well off
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert max(ratios) <= alpha + 1e-3, ratios  # each iteration shrinks the error by alpha at least
    assert errors[-1] <= errors[0] * alpha**6 * 1.01 and errors[-1] < 1e-2


def test_output_iterations_reduce_the_measured_inversion_error_of_a_rule():
    net, model, feedback, _, _ = _contracting_block()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    batch = Batch(x, torch.arange(8) % 6)
    spec = get_registry().rule("iterative_dtp")
    errors = [
        spec.make(input_iters=0, output_iters=t, output_init="decoder", influence_scaling="none")
        .evaluate(net, {"model": model}, {"feedback": feedback}, batch)["target_inversion_error"][0]
        for t in (0, 1, 3)
    ]
    # f o g - I and g o f - I contract by 0.3 here: the measured error follows 0.3^t
    assert errors[0] > 0.1 and errors[1] <= 0.31 * errors[0] and errors[2] <= 1.05 * 0.3**3 * errors[0], errors


# -- forward updates ----------------------------------------------------------------------------------
def test_dtp1_update_equals_the_closed_form():
    torch.manual_seed(0)
    net = _linear_chain([5, 7, 3], [nn.Tanh(), nn.Identity()], bias=False)
    model = net.init_params()
    x = torch.randn(4, 5)
    values = forward_values(net, model, x, "pre")
    tau = values[2] + 0.1 * torch.randn(4, 3)
    beta, weights = 0.25, torch.ones(4)
    update = tp.dtp1_update(net, model, 1, tau, values, weights, beta)
    s = torch.tanh(values[1])  # sigma(h_{l-1})
    closed = sum(torch.outer(tau[n] - values[2][n], s[n]) / s[n].dot(s[n]) for n in range(4)) / 4
    assert set(update) == {"blocks.1.layer.weight"}
    assert torch.allclose(update["blocks.1.layer.weight"], -closed / beta, atol=1e-6)


def test_a_dtp1_step_moves_the_pre_activation_exactly_onto_its_target():
    torch.manual_seed(1)
    net = _linear_chain([5, 7, 3], [nn.Tanh(), nn.Identity()])  # with biases
    model = net.init_params()
    x = torch.randn(1, 5)
    values = forward_values(net, model, x, "pre")
    tau = values[2] + torch.tensor([[0.3, -0.2, 0.5]])
    beta = 0.1
    update = tp.dtp1_update(net, model, 1, tau, values, torch.ones(1), beta)
    moved = {k: v - beta * update[k] if k in update else v for k, v in model.items()}  # SGD, lr = beta
    assert torch.allclose(encode(net, 1, moved, values[1], "pre"), tau, atol=1e-6)


def test_influence_scaling_follows_section_8():
    top = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # ||tau_L - h_L||^2 = 25, 1
    here = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # ||tau_l - h_l||^2 = 1, 4
    zeros2, zeros3 = torch.zeros(2, 2), torch.zeros(2, 3)
    targets, values = [None, here, top], [None, zeros3, zeros2]
    assert torch.allclose(tp.influence_weights(targets, values, 0, "example"), torch.tensor([25.0, 0.25]))
    assert torch.allclose(tp.influence_weights(targets, values, 0, "batch"), torch.tensor([26 / 5, 26 / 5]))


@pytest.mark.parametrize("rule", RULES)
def test_updates_are_local_gradients_and_the_output_block_gets_its_true_gradient(rule):
    torch.manual_seed(2)
    net = get_registry().model("mlp").make((1, 8, 8), (10,), depth=2, width=12)
    spec = get_registry().rule(rule)
    r = spec.make()
    params, state = r.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    updates, new_state, metrics = r.step(net, params, state, Batch(x, y, seed=7))
    model = params["model"]
    # reference: plain autograd on copies of the blocks, one block at a time
    options = {k: v for k, v in spec.options.items() if k in tp.Settings.__dataclass_fields__}
    options.setdefault("output_init", "decoder" if rule == "target_prop" else "difference")
    s = tp.Settings(**options)
    values = forward_values(net, model, x, s.space)
    targets = tp.compute_targets(net, model, new_state["feedback"], values, y, s)
    for i in range(3):
        w = model[f"blocks.{i}.layer.weight"].clone().requires_grad_(True)
        b = model[f"blocks.{i}.layer.bias"].clone().requires_grad_(True)
        out = torch.tanh(values[i].reshape(16, -1) @ w.T + b) if i < 2 else values[i] @ w.T + b
        weights = tp.influence_weights(targets, values, i, s.influence_scaling) if (
            i < 2 and s.influence_scaling != "none") else torch.ones(16)
        (weights * (out - targets[i + 1]).pow(2).sum(1)).sum().div(2 * s.beta * 16).backward()
        assert torch.allclose(updates["model"][f"blocks.{i}.layer.weight"], w.grad, atol=1e-5), i
        assert torch.allclose(updates["model"][f"blocks.{i}.layer.bias"], b.grad, atol=1e-5), i
    true = torch.func.grad(lambda p: F.cross_entropy(net.apply(p, x), y))(model)
    for k in ("blocks.2.layer.weight", "blocks.2.layer.bias"):
        assert torch.allclose(updates["model"][k], true[k], atol=1e-5)
    assert torch.isclose(metrics["loss"], F.cross_entropy(net.apply(model, x), y))


# -- feedback training --------------------------------------------------------------------------------
@pytest.mark.parametrize("objective,metric", [("autoencoder", "feedback_recon_error"),
                                              ("reverse", "feedback_reverse_error")])
def test_feedback_training_lowers_its_reconstruction_error(objective, metric):
    torch.manual_seed(3)
    net = get_registry().model("mlp").make((1, 8, 8), (10,), depth=2, width=16)
    spec = get_registry().rule("dtp")
    rule = spec.make(feedback_objective=objective, feedback_iters=50, feedback_noise=0.05)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 10
    batch = Batch(x, y, seed=1)
    kept = {k: {n: t.clone() for n, t in v.items()} for k, v in state["feedback"].items()}
    before = rule.evaluate(net, params, state, batch)[metric]
    _, trained, _ = rule.step(net, params, state, batch)
    after = rule.evaluate(net, params, trained, batch)[metric]
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    for k in kept:  # new decoders come back in the new state; the old state is untouched
        assert torch.equal(state["feedback"][k]["weight"], kept[k]["weight"])
        assert not torch.equal(trained["feedback"][k]["weight"], kept[k]["weight"])


# -- settings and errors ------------------------------------------------------------------------------
def test_every_setting_is_an_option_and_bad_settings_are_clear_errors():
    registry = get_registry()
    opts = registry.rule("iterative_dtp").options
    for key in ("beta", "space", "feedback_lr", "feedback_iters", "feedback_noise", "feedback_objective",
                "input_iters", "output_iters", "output_init", "dtp1", "influence_scaling"):
        assert key in opts, key
    assert registry.rule("dtp").models == ("mlp", "lenet", "vgg", "simple_vgg")
    with pytest.raises(UserError, match="space=pre"):
        registry.rule("iterative_dtp").make(dtp1=True)
    with pytest.raises(UserError, match="influence_scaling"):
        registry.rule("iterative_dtp").make(influence_scaling="sometimes")
    with pytest.raises(UserError, match="does not support model 'resnet'"):
        resolve(TrainConfig(rule="dtp", model="resnet"))


def test_cli_trains_dtp_on_digits_and_logs_the_feedback_metrics(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--rule", "dtp", "--dataset", "digits", "--epochs", "3",
                                      "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85
    angles = summary["alignment_angle_deg"]
    # the default first target (Lee et al.'s) is the exact gradient step on the last hidden block:
    # its update is backprop's, and only block 0's comes through a decoder
    assert len(angles) == 3 and angles[2] < 1e-2 and angles[1] < 1e-2 and angles[0] < 80
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["feedback_recon_error"]) == 1 and len(r["target_inversion_error"]) == 1 for r in rows)
    assert all(math.isfinite(e) and e < 1 for e in rows[-1]["target_inversion_error"])


@pytest.mark.parametrize("rule, options", [("dtp", {}), ("target_prop", {}), ("l_drl", {}),
                                           ("iterative_dtp", {}), ("dtp", {"first_target": "output"})])
def test_per_block_grads_give_the_same_step_with_the_memory_of_one_block(rule, options):
    from fa_rules.core.autodiff import SavedTensorsProbe
    from fa_rules.testing import make_setup

    spec = get_registry().rule(rule)
    peaks = {}
    for depth in (2, 6):
        steps = {}
        for per_block in (False, True):
            s = make_setup(spec, rule_options={**options, "per_block_grads": per_block})
            network = get_registry().model("mlp").make((1, 8, 8), (10,), activation="tanh", depth=depth, width=32)
            params, state = s.rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
            with SavedTensorsProbe() as probe:
                steps[per_block] = s.rule.step(network, params, state, s.batch)
            peaks[depth, per_block] = probe.peak
        (joint_updates, joint_state, joint_metrics) = steps[False]
        (block_updates, block_state, block_metrics) = steps[True]
        for a, b in ((joint_updates, block_updates), (joint_state, block_state)):
            flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
            assert len(flat_a) == len(flat_b) > 0
            for x, y in zip(flat_a, flat_b):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert joint_metrics["loss"] == block_metrics["loss"]
    # one block's graph at a time: the peak does not grow with depth; all blocks' at once, it does
    assert peaks[6, True] == peaks[2, True]
    assert peaks[6, False] > 2 * peaks[2, False] and peaks[6, False] > 2 * peaks[6, True]
