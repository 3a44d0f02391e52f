"""local_fa (Algorithms 2 and 3): updates against a plain-autograd reference, every block trains,
memory flat in depth, exact inversion of asinh, and the settings a user meets."""

import math

import pytest
import torch
from torch import nn

from fa_rules.core import Batch, SavedTensorsProbe, UserError
from fa_rules.models import mlp
from fa_rules.core.network import Asinh, Block, Network
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.plugins.datasets import load_digits
from fa_rules.plugins.manager import get_registry
from fa_rules.runs import resolve
from fa_rules.plugins.manager import get_registry
from fa_rules.rules.local_feature_alignment import local_feature_alignment


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _setup(rule, depth=2, width=16, latent=6, n=24, digits=None, seed=0):
    torch.manual_seed(seed)
    network = mlp((1, 8, 8), (latent,), depth=depth, width=width, activation="asinh")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(seed + 1))
    x = digits.train_x[:n].float()
    return network, params, state, Batch(x, digits.train_y[:n], seed=7)


def _reference_algorithm_2(network, model, x, seed, steps, tau, flow):
    """Algorithm 2 written out with plain torch.autograd on the raw weight tensors."""
    g = torch.Generator().manual_seed(seed)
    grads, losses = {}, []
    h = x.flatten(1)
    for i in range(network.num_blocks):
        w = model[f"blocks.{i}.layer.weight"].detach().clone().requires_grad_(True)
        b = model[f"blocks.{i}.layer.bias"].detach().clone().requires_grad_(True)
        act = torch.asinh if isinstance(network.blocks[i].activation, Asinh) else (lambda a: a)

        def f(r):
            a = r @ w.T + b
            return a if flow == "layer" else act(a)

        r = torch.rand(h.shape, generator=g).requires_grad_(True)  # init="uniform"
        z = f(h)
        for _ in range(steps):
            distance = 0.5 * (z - f(r)).pow(2).sum()
            r = r - tau * torch.autograd.grad(distance, r, create_graph=True)[0]
        c = (h - r).pow(2).mean()
        gw, gb = torch.autograd.grad(c, [w, b])
        grads[f"blocks.{i}.layer.weight"], grads[f"blocks.{i}.layer.bias"] = gw, gb
        losses.append(c.detach())
        with torch.no_grad():
            h = act(h @ w.T + b)
    return grads, losses


@pytest.mark.parametrize("flow", ["layer", "block"])
def test_each_block_update_equals_plain_autograd_algorithm_2(digits, flow):
    rule = local_feature_alignment(steps=2, tau=0.3, init="uniform", flow=flow, orthogonal=False)
    network, params, state, batch = _setup(rule, digits=digits)
    updates, _, metrics = rule.step(network, params, state, batch)
    reference, losses = _reference_algorithm_2(network, params["model"], batch.x, batch.seed, 2, 0.3, flow)
    assert set(updates["model"]) == set(reference) == set(params["model"])
    for key, expected in reference.items():
        assert expected.abs().max() > 0 or key.endswith("bias")
        torch.testing.assert_close(updates["model"][key], expected, rtol=1e-4, atol=1e-6, msg=key)
    for i, loss in enumerate(losses):
        torch.testing.assert_close(metrics[f"block{i}_loss"], loss)
    torch.testing.assert_close(metrics["loss"], sum(losses))
    bias_grads = torch.cat([reference[f"blocks.{i}.layer.bias"] for i in range(network.num_blocks)])
    if flow == "layer":  # the bias cancels in z - f(r): the layer flow never moves it
        assert bias_grads.abs().max() < 1e-6
    else:
        assert bias_grads.abs().max() > 1e-4


def test_every_parametrised_block_is_trained_and_its_local_loss_falls(digits):
    # PyTorch's default initialisation, so that no block starts at its optimum (an orthogonal
    # square block already inverts itself exactly)
    rule = get_registry().rule("local_fa").make(orthogonal=False)
    network, params, state, _ = _setup(rule, depth=3, width=32, latent=8, digits=digits)
    before = {k: v.clone() for k, v in params["model"].items()}
    optimizers = make_optimizers(TrainConfig(lr=3e-3), params)
    x = digits.train_x[:256].float()
    first = last = None
    for i in range(40):
        updates, state, metrics = rule.step(network, params, state, Batch(x, None, seed=i))
        apply_updates(rule, params, updates, optimizers)
        losses = [float(metrics[f"block{b}_loss"]) for b in range(network.num_blocks)]
        first = first or losses
        last = losses
    assert network.num_blocks == 4
    for b in range(network.num_blocks):
        w = f"blocks.{b}.layer.weight"
        assert (params["model"][w] - before[w]).norm() > 0.05 * before[w].norm(), f"block {b} did not train"
        assert last[b] < 0.7 * first[b], (b, first, last)
    assert max(v.abs().max() for v in params["model"].values() if v.ndim > 1) <= math.sqrt(2) + 1e-6  # Eq. 9


def _peak_saved_bytes(rule_name, depth, batch):
    rule = get_registry().rule(rule_name).make()
    torch.manual_seed(0)
    network = mlp((1, 8, 8), (8,), depth=depth, width=48, activation="asinh")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    with SavedTensorsProbe() as probe:
        rule.step(network, params, state, batch)
    return probe.peak


def test_peak_saved_bytes_of_local_fa_does_not_grow_with_depth(digits):
    # a copy: a view of the whole training set would be counted as its full storage
    batch = Batch(digits.train_x[:64].clone(), digits.train_y[:64], seed=0)
    local = [_peak_saved_bytes("local_fa", d, batch) for d in (2, 4, 8)]
    ae = [_peak_saved_bytes("ae", d, batch) for d in (2, 8)]
    assert local[0] > 48 * 64 * 4  # it does see the block's graph
    assert max(local) == min(local), local  # flat: one block's second-order graph, whatever the depth
    assert ae[1] > 2.5 * ae[0]  # backprop keeps every block
    assert local[2] <= 2 / 8 * ae[1], (local, ae)


def _identity_net(n=5, second_activation=None):
    blocks = []
    for act in (Asinh(), second_activation or nn.Identity()):
        layer = nn.Linear(n, n)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(n))
            layer.bias.zero_()
        blocks.append(Block(layer, act))
    return Network(blocks, family="custom", in_shape=(n,), out_shape=(n,))


def test_reconstruction_inverts_asinh_exactly_where_the_block_is_the_identity():
    network = _identity_net()
    rule = local_feature_alignment(orthogonal=False)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    x = 4 * torch.randn(16, 5, generator=torch.Generator().manual_seed(1))  # asinh is far from linear here
    latent = network.apply(params["model"], x)
    assert (latent - x).abs().max() > 1.0  # the forward really is asinh(x)
    x_hat = rule.reconstruct(network, params, state, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_hat, x, rtol=1e-5, atol=1e-5)


def test_reconstruction_is_exact_for_orthogonal_blocks_with_bias():
    network = _identity_net(n=6, second_activation=Asinh())
    g = torch.Generator().manual_seed(3)
    rule = local_feature_alignment(orthogonal=True)  # square orthogonal weights: W^T W = I
    params, state = rule.init(network, {"model": network.init_params()}, g)
    params["model"] = {k: (torch.randn(v.shape, generator=g) if k.endswith("bias") else v)
                       for k, v in params["model"].items()}
    x = torch.randn(8, 6, generator=g)
    x_hat = rule.reconstruct(network, params, state, x, g)
    torch.testing.assert_close(x_hat, x, rtol=1e-4, atol=1e-4)


def test_local_fa_prefers_asinh_and_refuses_a_non_invertible_activation():
    from fa_rules.core.trainer import TrainConfig as Config

    config = Config(rule="local_fa", model="mlp", model_options={"depth": 1, "width": 8})
    rule, _, build = resolve(config)
    network = build()
    assert config.model_options["activation"] == "asinh"
    assert all(isinstance(b.activation, Asinh) for b in network.blocks[:-1])
    relu = mlp((1, 8, 8), (4,), depth=1, width=8, activation="relu")
    with pytest.raises(UserError, match="invertible"):
        rule.init(relu, {"model": relu.init_params()}, torch.Generator())
    block_rule = local_feature_alignment(flow="block")  # the whole-block flow needs no inverse
    block_rule.init(relu, {"model": relu.init_params()}, torch.Generator())
    with pytest.raises(UserError, match="option 'flow' must be one of layer, block, got 'both'"):
        get_registry().rule("local_fa").make(flow="both")
    with pytest.raises(UserError, match="does not support model 'resnet'"):  # (conv encoders: test_local_fa_conv)
        resolve(Config(rule="local_fa", model="resnet"))


def test_local_fa_trains_the_paper_encoder_block_by_block():
    """The paper's 28x28 conv encoder (Table 7) with asinh: every conv and linear block moves."""
    from fa_rules.models import paper_encoder

    torch.manual_seed(0)
    network = paper_encoder((1, 28, 28), (8,), activation="asinh")
    rule = local_feature_alignment(orthogonal=False)  # (orthogonalising 4096 x 3136 is slow on CPU)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    updates, _, metrics = rule.step(network, params, state, Batch(x, None, seed=0))
    for b in range(network.num_blocks):
        assert updates["model"][f"blocks.{b}.layer.weight"].abs().max() > 0, b
        assert math.isfinite(float(metrics[f"block{b}_loss"]))
    x_hat = rule.reconstruct(network, params, state, x, torch.Generator())
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
