"""feature_alignment (Algorithm 1, Eq. 2-4, 9): updates against a plain-autograd reference (second
order through the flow), composition with a supervised loss, the weight clamp, orthogonal init."""

import math

import pytest
import torch
from torch.func import functional_call

from fa_rules.core import Batch, Rule, UserError, grad_and_value, no_state_init, weighted_sum
from fa_rules.core.gradient_flow import gradient_flow, initial_input
from fa_rules.models import mlp
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.plugins.datasets import load_digits
from fa_rules.plugins.manager import get_registry
from fa_rules.rules.feature_alignment import feature_alignment


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _leaves(model):
    return {k: v.detach().clone().requires_grad_(True) for k, v in model.items()}


def test_update_equals_plain_autograd_algorithm_1_through_every_inner_step(digits):
    rule = feature_alignment(steps=3, tau=0.2, init="uniform", squash="sigmoid", orthogonal=False)
    torch.manual_seed(0)
    network = mlp((1, 8, 8), (6,), depth=2, width=16, activation="tanh")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator())
    batch = Batch(digits.train_x[:20].clone(), None, seed=11)
    updates, _, metrics = rule.step(network, params, state, batch)

    # Algorithm 1 by hand: plain autograd, create_graph through the T inner steps
    p = _leaves(params["model"])
    x = batch.x
    r = torch.rand(x.shape, generator=torch.Generator().manual_seed(11)).requires_grad_(True)
    z_x = functional_call(network, p, (x,))
    for _ in range(3):
        distance = 0.5 * (z_x - functional_call(network, p, (r,))).pow(2).sum()
        r = r - 0.2 * torch.autograd.grad(distance, r, create_graph=True)[0]
    c = (x - torch.sigmoid(r)).pow(2).mean()
    expected = dict(zip(p, torch.autograd.grad(c, list(p.values()))))
    torch.testing.assert_close(metrics["loss"], c.detach())
    for key in expected:
        torch.testing.assert_close(updates["model"][key], expected[key], rtol=1e-4, atol=1e-7, msg=key)



def _regression() -> Rule:
    def step(network, params, state, batch):
        def loss_fn(model):
            return (network.apply(model, batch.x)[:, 0] - batch.y).pow(2).mean()

        grads, loss = grad_and_value(loss_fn)(params["model"])
        return {"model": grads}, state, {"loss": loss}

    return Rule(init=no_state_init, step=step, task="reconstruct")


def test_supervised_plus_feature_alignment_is_eq_3_and_4_through_the_weighted_sum():
    alpha, w_sup = 0.01, 0.5
    weight = torch.tensor([alpha, 1.0])  # output [f, l]: alpha ||f_x - f_r||^2 + ||l_x - l_r||^2
    rule = weighted_sum([(1.0, feature_alignment(output_weight=weight, orthogonal=False)), (w_sup, _regression())])
    torch.manual_seed(0)
    network = mlp((1,), (2,), depth=2, width=16, activation="tanh")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator())
    x = torch.linspace(-1, 1, 12).unsqueeze(1)
    y = torch.sin(3 * math.pi * x[:, 0])
    updates, _, metrics = rule.step(network, params, state, Batch(x, y, seed=0))

    p = _leaves(params["model"])
    out_x = functional_call(network, p, (x,))
    r = torch.zeros_like(x, requires_grad=True)
    distance = 0.5 * (weight * (out_x - functional_call(network, p, (r,))).pow(2)).sum()
    r_hat = r - torch.autograd.grad(distance, r, create_graph=True)[0]
    c = (x - r_hat).pow(2).mean() + w_sup * (y - out_x[:, 0]).pow(2).mean()  # Eq. 4
    expected = dict(zip(p, torch.autograd.grad(c, list(p.values()))))
    torch.testing.assert_close(metrics["loss"], c.detach())
    for key in expected:
        torch.testing.assert_close(updates["model"][key], expected[key], rtol=1e-4, atol=1e-7, msg=key)


def test_weights_are_clamped_to_sqrt_2_after_each_step_and_biases_are_not(digits):
    rule = get_registry().rule("feature_alignment").make()
    torch.manual_seed(0)
    network = mlp((1, 8, 8), (4,), depth=1, width=8)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator())
    huge = {"model": {k: torch.full_like(v, -1.0) for k, v in params["model"].items()}}
    apply_updates(rule, params, huge, make_optimizers(TrainConfig(optimizer="sgd", lr=10.0, momentum=0.0), params))
    for key, value in params["model"].items():
        if key.endswith("weight"):
            assert value.max().item() == pytest.approx(math.sqrt(2))  # Eq. 9
        else:
            assert value.min().item() > 9.0
    unclamped = feature_alignment(clamp_weights=False)
    assert unclamped.constraints == ()


def test_orthogonal_initialisation_from_the_rule_generator():
    rule = feature_alignment()
    torch.manual_seed(0)
    network = mlp((1, 8, 8), (4,), depth=2, width=32)
    a, _ = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(5))
    b, _ = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(5))
    c, _ = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(6))
    for key, w in a["model"].items():
        assert torch.equal(w, b["model"][key])
        if key.endswith("weight"):
            assert not torch.equal(w, c["model"][key])
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
        else:
            assert torch.equal(w, network.init_params()[key])


def test_feature_alignment_learns_to_reconstruct_digits_without_a_decoder(digits):
    rule = get_registry().rule("feature_alignment").make()
    torch.manual_seed(0)
    network = mlp((1, 8, 8), (16,), depth=1, width=64, activation="tanh")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    optimizers = make_optimizers(TrainConfig(lr=3e-3), params)
    x, test = digits.train_x[:512].clone(), digits.test_x[:200].clone()

    def test_mse():
        return (rule.reconstruct(network, params, state, test, torch.Generator()) - test).pow(2).mean().item()

    mean_image = (test - x.mean(0)).pow(2).mean().item()
    start = test_mse()
    for i in range(60):
        idx = torch.randperm(512, generator=torch.Generator().manual_seed(i))[:128]
        updates, state, _ = rule.step(network, params, state, Batch(x[idx], None, seed=i))
        apply_updates(rule, params, updates, optimizers)
    end = test_mse()
    assert end < 0.5 * start and end < 0.6 * mean_image, (start, end, mean_image)


def test_flow_settings_are_checked_when_the_rule_is_built():
    spec = get_registry().rule("feature_alignment")
    with pytest.raises(UserError, match="option 'init' must be one of zeros, uniform, normal"):
        spec.make(init="gaussian")
    with pytest.raises(UserError, match=r"option 'steps' must be an integer in 1\.\.10000, got 0"):
        spec.make(steps=0)
    with pytest.raises(UserError, match="squash"):
        spec.make(squash="tanh")


def test_gradient_flow_is_plain_gradient_descent_on_a_linear_map():
    """Appendix A, Eq. 13-18, for one linear unit: r_t = r_0 (1 - w^2)^t + sum_q (1 - w^2)^q w a."""
    w, a = 0.8, torch.tensor([[1.5]])
    r0 = torch.tensor([[0.3]])
    r = gradient_flow(lambda r: w * r, a, r0, steps=5, step_size=1.0)
    k = 1 - w**2
    expected = r0 * k**5 + sum(k**q for q in range(5)) * w * a
    torch.testing.assert_close(r, expected)
    assert initial_input("zeros", r0, None).eq(0).all()
