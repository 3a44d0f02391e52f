"""dfc against references written here from the paper's equations (Meulemans et al. 2021)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Batch, Network, UserError
from fa_rules.core.feedback_control import Dynamics, simulate, weight_product_feedback
from fa_rules.core.network import Block
from fa_rules.plugins.manager import get_registry
from fa_rules.rules import deep_feedback_control as dfc
from fa_rules.testing import assert_conformant


def _net(widths, activation, seed=0, dtype=torch.float64):
    """A chain of Linear blocks, `activation` on the hidden ones, identity on the output."""
    torch.manual_seed(seed)
    last = len(widths) - 2
    blocks = [Block(nn.Linear(a, b), nn.Identity() if i == last else activation(), in_shape=(a,) if i == 0 else None)
              for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
    net = Network(blocks, in_shape=(widths[0],), family="mlp").to(dtype)
    return net, net.init_params()


def _forward_with_control(net, model, x, feedback, u):
    """Eq. 1 at rest: v_i = W_i phi(v_{i-1}) + b_i + Q_i u; returns (pre-activations, block inputs)."""
    vs, rs, r = [], [], x
    for i, block in enumerate(net.blocks):
        w, b = model[f"blocks.{i}.layer.weight"], model[f"blocks.{i}.layer.bias"]
        rs.append(r)
        v = r @ w.T + b + u @ feedback[i].T
        vs.append(v)
        r = block.activation(v)
    return vs, rs


def _output_jacobian(net, model, x):
    """J = d r_out / d v for one example, all blocks side by side (by autograd, not by the rule)."""
    sizes = [b.layer.out_features for b in net.blocks]

    def out(*dv):
        r = x
        for i, block in enumerate(net.blocks):
            r = block.activation(r @ model[f"blocks.{i}.layer.weight"].T + model[f"blocks.{i}.layer.bias"] + dv[i])
        return r[0]

    zeros = tuple(torch.zeros(1, n, dtype=x.dtype) for n in sizes)
    return torch.cat([j.reshape(sizes[-1], -1) for j in torch.autograd.functional.jacobian(out, zeros)], 1)


def _target(net, model, x, y, stepsize):
    out = net.apply(model, x)
    return out - stepsize * (F.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(out.dtype))


def test_the_dynamics_settle_on_the_steady_state_solved_directly():
    net, model = _net([5, 6, 7, 3], nn.Tanh)  # two hidden layers
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    gen = torch.Generator().manual_seed(2)
    feedback = [q + 0.2 * torch.randn(q.shape, generator=gen, dtype=q.dtype)
                for q in weight_product_feedback(net, model)]
    alpha, target = 0.05, _target(net, model, x, y, 1.0)  # a large step: the steady state is nonlinear
    ss = simulate(net, model, feedback, x, target, Dynamics(600, 0.05, 0.1, 1.0, 0.5, alpha))

    # reference: Newton's method on the steady-state condition of Eq. 4, e(u) - alpha u = 0, with
    # e(u) = r^* - r_out(u) and r_out(u) from Eq. 1 at rest, one example at a time
    def residual(u, n):
        vs, _ = _forward_with_control(net, model, x[n:n + 1], feedback, u[None])
        return target[n] - net.blocks[-1].activation(vs[-1])[0] - alpha * u

    u_ref = torch.zeros(4, 3, dtype=torch.float64)
    for n in range(4):
        for _ in range(30):
            jac = torch.autograd.functional.jacobian(lambda u: residual(u, n), u_ref[n])
            u_ref[n] = u_ref[n] - torch.linalg.solve(jac, residual(u_ref[n], n))
        assert residual(u_ref[n], n).abs().max() < 1e-12
    v_ref, r_ref = _forward_with_control(net, model, x, feedback, u_ref)
    assert torch.allclose(ss.u, u_ref, atol=1e-7)
    for i in range(3):
        assert torch.allclose(ss.v[i], v_ref[i], atol=1e-7), i
        assert torch.allclose(ss.inputs[i], r_ref[i], atol=1e-7), i
    assert ss.controller_residual < 1e-6 and ss.network_residual < 1e-6
    feedforward = net.apply(model, x)
    assert (ss.v[-1] - feedforward).abs().max() > 0.1  # the controller moved the output a long way
    # stopping early is visible in the residuals
    short = simulate(net, model, feedback, x, target, Dynamics(5, 0.05, 0.1, 1.0, 0.5, alpha))
    assert short.controller_residual > 0.1


def test_with_small_target_stepsize_the_update_is_the_gauss_newton_direction():
    """Theorem 2 / Condition 2: with Q = J^T, alpha -> 0 and lambda -> 0 the steady-state change is
    Delta v = J^T (J J^T)^{-1} delta, so Delta W_i = Delta v_i r_{i-1}^T is the minimum-norm
    (Gauss-Newton) update; it is not the gradient direction."""
    net, model = _net([5, 6, 7, 3], nn.Tanh, seed=4)
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([2])
    jac = _output_jacobian(net, model, x)
    sizes = [6, 7, 3]
    feedback = list(torch.split(jac.T, sizes, 0))  # Q = J^T
    stepsize, alpha = 1e-4, 1e-5
    s = dfc.Settings(stepsize, Dynamics(400, 0.1, 0.1, 1.0, 0.0, alpha), Dynamics(1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.1),
                     "fixed", "product", 0.0, "voltage", "steady_state").check()
    target = _target(net, model, x, y, stepsize)
    ss = simulate(net, model, feedback, x, target, s.forward)
    update = dfc.forward_updates(net, model, ss, s)
    delta = target - net.apply(model, x)
    dv = jac.T @ torch.linalg.solve(jac @ jac.T, delta[0])  # Gauss-Newton (minimum-norm) change of v
    _, inputs = _forward_with_control(net, model, x, feedback, torch.zeros(1, 3, dtype=torch.float64))
    gauss_newton, gradient = [], []
    true = torch.func.grad(lambda m: F.cross_entropy(net.apply(m, x), y))(model)
    for i, dvi in enumerate(torch.split(dv, sizes)):
        gauss_newton += [-torch.outer(dvi, inputs[i][0]) / stepsize, -dvi / stepsize]
        gradient += [true[f"blocks.{i}.layer.weight"], true[f"blocks.{i}.layer.bias"]]
    ours = torch.cat([update[k].flatten() for k in model])
    gn = torch.cat([t.flatten() for t in gauss_newton])
    grad = torch.cat([t.flatten() for t in gradient])
    assert F.cosine_similarity(ours, gn, dim=0) > 0.9999
    assert torch.allclose(ours, gn, rtol=1e-2, atol=1e-6 * gn.abs().max())
    assert F.cosine_similarity(ours, grad, dim=0) < 0.99  # a different direction from backprop's


def test_fixed_feedback_on_a_linear_network_gives_damped_gauss_newton_exactly():
    """For a linear network the weight product is J^T, the dynamics are linear, and the steady
    state is Delta v = J^T (J J^T + alpha I)^{-1} delta for any target step."""
    spec = get_registry().rule("dfc")
    rule = spec.make(feedback="fixed", steps=300)
    torch.manual_seed(6)
    net = get_registry().model("mlp").make((1, 4, 2), (3,), depth=2, width=5, activation="identity")
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    model = params["model"]
    x, y = torch.rand(6, 1, 4, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    updates, _, metrics = rule.step(net, params, state, Batch(x, y, seed=3))
    w = [model[f"blocks.{i}.layer.weight"].double() for i in range(3)]
    b = [model[f"blocks.{i}.layer.bias"].double() for i in range(3)]
    jac = torch.cat([w[2] @ w[1], w[2], torch.eye(3, dtype=torch.float64)], 1)  # d out / d (v_0, v_1, v_2)
    h0 = x.reshape(6, -1).double()
    out = ((h0 @ w[0].T + b[0]) @ w[1].T + b[1]) @ w[2].T + b[2]
    lam, alpha = spec.options["target_stepsize"], spec.options["alpha"]
    delta = -lam * (F.softmax(out, 1) - F.one_hot(y, 3).double())
    dv = delta @ torch.linalg.solve(jac @ jac.T + alpha * torch.eye(3, dtype=torch.float64), jac)  # rows: examples
    dv = torch.split(dv, [5, 5, 3], 1)
    r, expected = h0, {}
    for i in range(3):
        v = r @ w[i].T + b[i] + dv[i]  # the controlled pre-activation (the network is linear)
        expected[f"blocks.{i}.layer.weight"] = -(dv[i].T @ r) / (lam * 6)
        expected[f"blocks.{i}.layer.bias"] = -dv[i].sum(0) / (lam * 6)
        r = v
    for k, e in expected.items():
        assert torch.allclose(updates["model"][k].double(), e, atol=1e-5, rtol=1e-3), k
    assert metrics["steady_state_residual"] < 1e-4
    assert metrics["output_error_ratio"] < 0.1  # alpha = 0.01 leaves a small output error


def test_feedback_learning_moves_q_into_the_row_space_of_the_jacobian():
    """Condition 2 (Col(Q) = Row(J)): learned from noise alone (Eq. 13), measured on a linear
    network, where J does not depend on the input."""
    spec = get_registry().rule("dfc")
    rule = spec.make(feedback="learned", feedback_init="random", feedback_decay=0.0)
    torch.manual_seed(7)
    net = get_registry().model("mlp").make((1, 4, 2), (3,), depth=2, width=6, activation="identity")
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    model = params["model"]
    w = [model[f"blocks.{i}.layer.weight"] for i in range(3)]
    jac = torch.cat([w[2] @ w[1], w[2], torch.eye(3)], 1)
    projector = jac.T @ torch.linalg.solve(jac @ jac.T, jac)

    def outside(feedback):  # share of Q outside Row(J)
        q = torch.cat([feedback[k] for k in dfc.feedback_keys(net)], 0)
        return float(((torch.eye(15) - projector) @ q).norm() / q.norm())

    x = torch.rand(32, 1, 4, 2)  # the feedback phase needs inputs only (it is driven by noise)
    feedback = params["feedback"]
    before = outside(feedback)
    for step in range(120):
        grads, _ = dfc.feedback_updates(net, model, [feedback[k] for k in dfc.feedback_keys(net)], x,
                                        rule_settings(spec, feedback="learned", feedback_init="random",
                                                      feedback_decay=0.0),
                                        torch.Generator().manual_seed(step))
        feedback = {k: v - 0.1 * grads[k] for k, v in feedback.items()}
    after = outside(feedback)
    assert before > 0.5 and after < 0.3 * before, (before, after)


def rule_settings(spec, **overrides) -> dfc.Settings:
    """The Settings a registered dfc builds (same defaults), for calling the rule's pieces."""
    o = {**spec.options, **overrides}
    return dfc.Settings(
        o["target_stepsize"], Dynamics(o["steps"], o["dt"], o["tau_v"], o["tau_u"], o["k_p"], o["alpha"]),
        Dynamics(o["feedback_steps"], o["feedback_dt"], o["tau_v"], o["tau_u"], o["feedback_k_p"],
                 o["feedback_alpha"], o["feedback_noise"], o["feedback_tau_a"]),
        o["feedback"], o["feedback_init"], o["feedback_decay"], o["difference"], o["update"],
    ).check()


@pytest.mark.parametrize("feedback", ["learned", "fixed"])
def test_dfc_is_conformant(feedback):
    spec = get_registry().rule("dfc")
    spec = type(spec)(spec.name, spec.build, spec.summary, {**spec.options, "feedback": feedback}, spec.models,
                      model_defaults=spec.model_defaults)
    assert_conformant(spec)


def test_bad_settings_are_clear_errors():
    spec = get_registry().rule("dfc")
    with pytest.raises(UserError, match="overshoots"):
        spec.make(dt=0.5, tau_v=0.1)
    with pytest.raises(UserError, match="feedback_noise"):
        spec.make(feedback="learned", feedback_noise=0.0)
    with pytest.raises(UserError, match="difference"):
        spec.make(difference="both")


def test_cli_trains_dfc_on_digits_and_logs_the_steady_state_residual(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--rule", "dfc", "--dataset", "digits", "--epochs", "2",
                                      "--opt", "feedback=fixed", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.8
    assert summary["params_by_group"] == {"model": summary["params"]}  # fixed Q: no feedback group
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_steady_state_residual"] < 1e-2 for r in rows)
    assert all(0 < r["train_output_error_ratio"] < 0.1 for r in rows)
