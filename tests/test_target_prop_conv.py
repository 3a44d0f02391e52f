"""The target-propagation family on convolutional networks (Ernoult et al. 2022, "Towards scaling
difference target propagation by learning backprop targets"; Meulemans et al. 2020's DDTP on conv
nets): decoders that transpose the convolution, unpool with the forward pass's indices and reshape
the flatten; one step of every rule against a float64 reference written here from the equations."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Batch, Network, UserError
from fa_rules.core.config import TrainConfig
from fa_rules.core.inverse import decoder_for, forward_pass
from fa_rules.core.network import Block
from fa_rules.plugins.manager import get_registry
from fa_rules.runs import resolve
from fa_rules.testing import CHECKS, run_check
from test_resnets import _write_cifar  # a tiny CIFAR-10-format file set

RULES = ("target_prop", "dtp", "iterative_dtp", "l_drl", "ddtp")
ROOT = Path(__file__).resolve().parents[1]


def _tiny_conv_net():
    """conv3(3)-tanh-pool, conv3(4)-tanh-pool, flatten, fc6-tanh, fc10 on 8x8 inputs, in float64."""
    torch.manual_seed(0)
    blocks = [Block(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)),
              Block(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2)),
              Block(nn.Linear(16, 6), nn.Tanh(), in_shape=(16,)),
              Block(nn.Linear(6, 10))]
    return Network(blocks, in_shape=(1, 8, 8), family="lenet").double()


def _digits(n=32, dtype=torch.float64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=dtype).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[:n], dtype=torch.int64)


# -- decoders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,shape,options", [
    ("lenet", (1, 8, 8), {}), ("lenet", (1, 28, 28), {}), ("vgg", (1, 8, 8), {"width": 4, "batch_norm": False}),
    ("simple_vgg", (3, 32, 32), {"width_multiplier": 1 / 32}), ("simple_vgg", (1, 28, 28), {"width_multiplier": 1 / 32}),
])
def test_every_decoder_maps_its_block_output_back_to_the_exact_input_shape(model, shape, options):
    net = get_registry().model(model).make(shape, (10,), **options)
    params = net.init_params()
    values, indices = forward_pass(net, params, torch.rand(2, *shape), "post")
    for i in range(1, net.num_blocks):
        dec = decoder_for(net, i, "post")
        out = dec(dec.init(torch.Generator().manual_seed(i)), values[i + 1], indices[i + 1])
        assert out.shape == values[i].shape, (model, i)
        if isinstance(net.blocks[i].layer, nn.Conv2d):
            layer = net.blocks[i].layer
            assert dec.kind == "conv_transpose"
            assert dec.weight_shape == (layer.out_channels, layer.in_channels, *layer.kernel_size)
            assert (dec.unpool is not None) == isinstance(net.blocks[i].post, nn.MaxPool2d)
            # Ernoult et al.'s form: the block's own activation between unpooling and the transposed conv
            assert dec.in_activation is net.blocks[i].activation and isinstance(dec.out_activation, nn.Identity)
            other = decoder_for(net, i, "post", conv_decoder="activation_below")
            assert isinstance(other.in_activation, nn.Identity) and other.out_activation is net.blocks[i - 1].activation


def test_a_linear_conv_pool_decoder_with_the_forward_weights_is_the_blocks_transposed_jacobian():
    """With an identity activation, `g(v) = W^T * unpool(v, idx)` is exactly `J_f^T v` of
    `f = pool o conv` at the forward point: unpooling with the forward's indices is the adjoint of
    the max pool, and the transposed convolution that of the conv (block 0: a 9x9 map pooled to 4x4,
    unpooled back to 9x9; block 1: a stride-2 conv, restored by its output padding)."""
    torch.manual_seed(1)
    net = Network([Block(nn.Conv2d(2, 3, 3, padding=1), nn.Identity(), nn.MaxPool2d(2)),
                   Block(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Identity(), nn.MaxPool2d(2)),
                   Block(nn.Linear(5, 4), in_shape=(5,))], in_shape=(2, 9, 9)).double()
    params = net.init_params()
    values, indices = forward_pass(net, params, torch.randn(3, 2, 9, 9, dtype=torch.float64), "post")
    for i in (0, 1):
        dec = decoder_for(net, i, "post")
        v = torch.randn_like(values[i + 1])
        q = {"weight": params[f"blocks.{i}.layer.weight"], "bias": torch.zeros(dec.out_features, dtype=torch.float64)}
        _, vjp = torch.func.vjp(lambda z: net.block_apply(i, params, z), values[i])
        assert torch.allclose(dec(q, v, indices[i + 1]), vjp(v)[0], atol=1e-12), i
    assert decoder_for(net, 1, "post").output_padding == (1, 1)


# -- one step against float64 references from the papers' equations ------------------------------------
def _block(model, i, x):
    """The tiny net's block i written out: conv-tanh-pool (with the pool's argmax), fc-tanh, fc."""
    w, b = model[f"blocks.{i}.layer.weight"], model[f"blocks.{i}.layer.bias"]
    if i < 2:
        return F.max_pool2d(torch.tanh(F.conv2d(x, w, b, padding=1)), 2, return_indices=True)
    out = F.linear(x.reshape(x.shape[0], -1), w, b)
    return (torch.tanh(out) if i == 2 else out), None


def _decode(i, q, h, idx, form):
    """g_i: block 1 unpools with the forward's indices, then either applies its own tanh and
    transposes its conv (Ernoult et al.'s reversed block) or transposes its conv and applies the tanh
    of the block below (`activation_below`); blocks 2 and 3 map back with tanh of the block below,
    block 2's output reshaped to the pooled feature map (the flatten's inverse)."""
    if i == 1:
        unpooled = F.max_unpool2d(h, idx, 2, 2, output_size=(4, 4))
        if form == "reversed_block":
            return F.conv_transpose2d(torch.tanh(unpooled), q["weight"], q["bias"], padding=1)
        return torch.tanh(F.conv_transpose2d(unpooled, q["weight"], q["bias"], padding=1))
    out = torch.tanh(F.linear(h, q["weight"], q["bias"]))
    return out.reshape(-1, 4, 2, 2) if i == 2 else out


def _ce_delta(out, y):  # d(per-example cross-entropy)/d logits
    return F.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(out.dtype)


def _local_updates(model, values, targets, beta, weights=None):
    """Each block's gradient of sum_n w_n ||f_i(h_{i,n}) - tau_{i+1,n}||^2 / (2 beta N), alone."""
    updates, n = {}, values[0].shape[0]
    for i in range(4):
        keys = [f"blocks.{i}.layer.weight", f"blocks.{i}.layer.bias"]
        p = {k: model[k].clone().requires_grad_(True) for k in keys}
        w = 1.0 if weights is None or i == 3 else weights[i]
        out = _block({**model, **p}, i, values[i])[0]
        loss = (w * (out - targets[i + 1]).pow(2).flatten(1).sum(1)).sum() / (2 * beta * n)
        grads = torch.autograd.grad(loss, [p[k] for k in keys])
        updates.update(dict(zip(keys, grads)))
    return updates


def _reference_tp(model, feedback, x, y, seed, *, objective, beta, lr, noise, normalise, init, first_target,
                  input_iters=0, output_iters=0, influence=False, iters=None, form="reversed_block"):
    """`lr`, `noise`, `iters`: one value, or one per decoder from the bottom (`block_feedback_*`)."""
    values, indices = [x], [None]
    for i in range(4):
        v, idx = _block(model, i, values[-1])
        values.append(v)
        indices.append(idx)
    gen = torch.Generator().manual_seed(seed)
    blocks = [1, 2] if first_target == "penultimate" else [1, 2, 3]
    per = {name: dict(zip(blocks, v if isinstance(v, (list, tuple)) else [v] * len(blocks)))
           for name, v in (("lr", lr), ("noise", noise), ("iters", iters or 1))}
    trained = {str(i): dict(feedback[str(i)]) for i in blocks}
    for t in range(max(per["iters"].values())):
        inputs = {}
        for i in [b for b in blocks if per["iters"][b] > t]:  # noise drawn block by block, as the rule draws it
            sigma = per["noise"][i]
            if objective == "autoencoder":
                xn = values[i] + sigma * torch.randn(values[i].shape, generator=gen, dtype=x.dtype)
                inputs[i] = (xn, *_block(model, i, xn))
            else:
                eps = sigma * torch.randn(values[i].shape, generator=gen, dtype=x.dtype)
                eta = sigma * torch.randn(values[i + 1].shape, generator=gen, dtype=x.dtype)
                inputs[i] = (eps, eta, *_block(model, i, values[i] + eps))
        for i in inputs:
            q = {k: v.clone().requires_grad_(True) for k, v in trained[str(i)].items()}
            if objective == "autoencoder":  # Lee et al.: 1/2 ||g(f(h + eps)) - (h + eps)||^2, normalised LMS
                xn, code, idx = inputs[i]
                z = F.max_unpool2d(code, idx, 2, 2, output_size=(4, 4)) if i == 1 else code
                z = torch.tanh(z) if i == 1 and form == "reversed_block" else z
                scale = z.pow(2).sum() / z.shape[0] + 1.0
                if i == 1:  # one output unit of the transposed conv sees a 3x3 patch of its 4x4 input
                    scale = z.pow(2).sum() / z.shape[0] / 16 * 9 + 1.0
                loss = 0.5 * (_decode(i, q, code, idx, form) - xn).pow(2).flatten(1).sum(1).mean() / (scale if normalise else 1)
            else:  # Ernoult et al.'s L-DRL, halved and divided by sigma^2
                eps, eta, moved, moved_idx = inputs[i]
                g_h = _decode(i, q, values[i + 1], indices[i + 1], form)
                recon = ((_decode(i, q, moved, moved_idx, form) - g_h) * eps).flatten(1).sum(1)
                spread = (_decode(i, q, values[i + 1] + eta, indices[i + 1], form) - g_h).pow(2).flatten(1).sum(1)
                loss = 0.5 * (-2 * recon + spread).mean() / per["noise"][i] ** 2
            grads = torch.autograd.grad(loss, list(q.values()))
            trained[str(i)] = {k: v.detach() - per["lr"][i] * g for (k, v), g in zip(q.items(), grads)}
    # targets: tau_L = h_L - beta dl/dh_L, then carried down through the decoders
    targets = [None] * 5
    targets[4] = values[4] - beta * _ce_delta(values[4], y)
    if first_target == "penultimate":  # Lee et al.'s Algorithm 1: the exact step on h_{L-1}
        targets[3] = values[3] - beta * _ce_delta(values[4], y) @ model["blocks.3.layer.weight"]
    for i in reversed(blocks):
        q, tau, h, idx = trained[str(i)], targets[i + 1], values[i + 1], indices[i + 1]

        def corrected(t):  # Bengio 2020, sec. 5: u <- u + t - f(g(u)), then g(u)
            u = t
            for _ in range(input_iters):
                u = u + t - _block(model, i, _decode(i, q, u, idx, form))[0]
            return _decode(i, q, u, idx, form)

        if init == "decoder":
            below = corrected(tau)
        else:  # the difference correction of DTP
            below = values[i] + corrected(tau) - corrected(h)
        for _ in range(output_iters):  # sec. 6.2: x <- x + g(tau) - g(f(x)), f(x) unpooled with its own indices
            below = below + _decode(i, q, tau, idx, form) - _decode(i, q, *_block(model, i, below), form)
        targets[i] = below
    weights = None
    if influence:  # sec. 8, batch form: ||tau_L - h_L||^2 / ||tau_l - h_l||^2 as a ratio of batch means
        top = (targets[4] - values[4]).pow(2).sum(1).mean()
        weights = [top / (targets[i + 1] - values[i + 1]).pow(2).flatten(1).sum(1).mean() for i in range(3)]
    return _local_updates(model, values, targets, beta, weights), trained


def _reference_ddtp(model, feedback, x, y, seed, *, beta, lr, noise, reg):
    values = [x]
    for i in range(4):
        values.append(_block(model, i, values[-1])[0])
    h_out = values[4]
    gen = torch.Generator().manual_seed(seed)
    trained = {}
    for i in range(3):  # Meulemans et al.'s direct DRL for Q_i (output -> flattened h_i), normalised
        h = values[i + 1]
        eps_1 = noise * torch.randn(h.shape, generator=gen, dtype=x.dtype)
        eps_2 = noise * torch.randn(h_out.shape, generator=gen, dtype=x.dtype)
        moved = h + eps_1
        for j in range(i + 1, 4):
            moved = _block(model, j, moved)[0]
        q = feedback[f"blocks.{i}"].clone().requires_grad_(True)
        scale = (moved - h_out).pow(2).sum(1).mean() + reg * eps_2.pow(2).sum(1).mean()
        per = ((moved - h_out) @ q.T - eps_1.flatten(1)).pow(2).sum(1) + reg * (eps_2 @ q.T).pow(2).sum(1)
        (grad,) = torch.autograd.grad(0.5 * per.mean() / scale, [q])
        trained[f"blocks.{i}"] = q.detach() - lr * grad
    targets = [None] * 5
    targets[4] = h_out - beta * _ce_delta(h_out, y)
    for i in range(3):  # tau_i = h_i + Q_i (tau_L - h_L), reshaped to the feature map
        targets[i + 1] = values[i + 1] + ((targets[4] - h_out) @ trained[f"blocks.{i}"].T).reshape(values[i + 1].shape)
    return _local_updates(model, values, targets, beta), trained


REFERENCES = {  # each rule's defaults; the conv decoder's form is the rule's default too
    "target_prop": dict(objective="autoencoder", beta=5.0, lr=1.0, noise=0.3, normalise=True, init="decoder",
                        first_target="output", form="activation_below"),
    "dtp": dict(objective="autoencoder", beta=0.5, lr=1.0, noise=0.3, normalise=True, init="difference",
                first_target="penultimate", form="activation_below"),
    "iterative_dtp": dict(objective="autoencoder", beta=0.5, lr=1.0, noise=0.3, normalise=True, init="difference",
                          first_target="output", input_iters=1, output_iters=2, influence=True,
                          form="activation_below"),
    "l_drl": dict(objective="ldrl", beta=0.5, lr=0.05, noise=0.1, normalise=False, init="difference",
                  first_target="output", form="reversed_block"),
}
OTHER_FORM = {"activation_below": "reversed_block", "reversed_block": "activation_below"}


@pytest.mark.parametrize("rule,other_form", [(r, False) for r in RULES] + [("dtp", True), ("l_drl", True)])
def test_one_step_on_a_conv_net_equals_the_float64_reference_from_the_papers_equations(rule, other_form):
    net = _tiny_conv_net()
    spec = get_registry().rule(rule)
    reference = dict(REFERENCES.get(rule, {}))
    if other_form:
        reference["form"] = OTHER_FORM[reference["form"]]
    r = spec.make(**({"conv_decoder": reference["form"]} if other_form else {}))
    params, state = r.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(3))
    x, y = _digits(24)
    updates, new_state, metrics = r.step(net, params, state, Batch(x, y, seed=11))
    model = params["model"]
    if rule == "ddtp":
        expected, trained = _reference_ddtp(model, state["feedback"], x, y, 11, beta=0.5, lr=1.0, noise=0.1, reg=0.1)
        for k, q in trained.items():
            assert torch.allclose(new_state["feedback"][k], q, atol=1e-10, rtol=0), k
    else:
        expected, trained = _reference_tp(model, state["feedback"], x, y, 11, **reference)
        assert set(new_state["feedback"]) == set(trained)
        for b, q in trained.items():
            for k in q:
                assert torch.allclose(new_state["feedback"][b][k], q[k], atol=1e-10, rtol=0), (b, k)
                assert not torch.equal(state["feedback"][b][k], q[k])  # the decoders did move
    for k, g in expected.items():
        assert torch.allclose(updates["model"][k], g, atol=1e-10, rtol=0), k
        assert g.abs().max() > 1e-6, k  # every block, the convolutions too, gets a signal
    assert torch.isclose(metrics["loss"], F.cross_entropy(net.apply(model, x), y))


def test_per_decoder_lr_noise_and_iterations_follow_the_reference():
    """`feedback_per_decoder`: Ernoult et al.'s per-layer feedback settings, LR:NOISE:ITERS per decoder."""
    net = _tiny_conv_net()
    r = get_registry().rule("l_drl").make(feedback_per_decoder="0.01:0.2:2, 0.05:0.1:0, 0.1:0.05:3")
    params, state = r.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(3))
    x, y = _digits(16)
    updates, new_state, _ = r.step(net, params, state, Batch(x, y, seed=5))
    expected, trained = _reference_tp(params["model"], state["feedback"], x, y, 5, **{
        **REFERENCES["l_drl"], "lr": [0.01, 0.05, 0.1], "noise": [0.2, 0.1, 0.05], "iters": [2, 0, 3]})
    for b, q in trained.items():
        for k in q:
            assert torch.allclose(new_state["feedback"][b][k], q[k], atol=1e-10, rtol=0), (b, k)
    assert torch.equal(new_state["feedback"]["2"]["weight"], state["feedback"]["2"]["weight"])  # 0 iterations
    assert not torch.equal(new_state["feedback"]["3"]["weight"], state["feedback"]["3"]["weight"])
    for k, g in expected.items():
        assert torch.allclose(updates["model"][k], g, atol=1e-10, rtol=0), k
    with pytest.raises(UserError, match="feedback_per_decoder lists 2 decoders; this network trains 3"):
        get_registry().rule("l_drl").make(feedback_per_decoder="0.1:0.1:1,0.2:0.1:1").init(
            net, {"model": net.init_params()}, torch.Generator())
    with pytest.raises(UserError, match="feedback_per_decoder takes LR:NOISE:ITERS.*got '0.1:0.1:two'"):
        get_registry().rule("dtp").make(feedback_per_decoder="0.1:0.1:1, 0.1:0.1:two")
    with pytest.raises(UserError, match="feedback_noise > 0"):
        get_registry().rule("l_drl").make(feedback_per_decoder="0.1:0.1:1, 0.1:0:1")


# -- conformance, refusals, training ---------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_every_conformance_check_passes_on_lenet(rule):
    """Every check but `learns` (which `test_a_few_steps_on_digits_reduce_the_loss` covers on the
    conv net) on the zoo's LeNet; `assert_conformant(rule)` runs them all on the MLP and on LeNet."""
    spec = get_registry().rule(rule)
    assert {"lenet", "vgg", "simple_vgg"} <= set(spec.models)
    lenet_only = type(spec)(spec.name, spec.build, spec.summary, spec.options, ("lenet",),
                            model_defaults=spec.model_defaults, ranges=spec.ranges)
    for check in CHECKS:
        if check != "learns":
            run_check(lenet_only, check)


def test_settings_that_need_linear_blocks_or_no_pools_refuse_in_one_line_on_conv_nets():
    registry = get_registry()
    net = registry.model("lenet").make((1, 8, 8), (10,))
    params = {"model": net.init_params()}
    with pytest.raises(UserError, match="dtp1 is the closed-form update of a Linear block.*block 0 is Conv2d"):
        registry.rule("iterative_dtp").make(space="pre", dtp1=True).init(net, params, torch.Generator())
    with pytest.raises(UserError, match="block 0 pools: its decoders need space=post"):
        registry.rule("dtp").make(space="pre").init(net, params, torch.Generator())
    with_norm = registry.model("vgg").make((1, 8, 8), (10,), width=4, batch_norm=True)
    with pytest.raises(UserError, match="BatchNorm2d.*batch_norm=false"):
        registry.rule("l_drl").make().init(with_norm, {"model": with_norm.init_params()}, torch.Generator())
    with pytest.raises(UserError, match="does not support model 'resnet'"):
        resolve(TrainConfig(rule="dtp", model="resnet", dataset="digits"))
    # under the family's model defaults vgg is built without batch norm, LeNet with tanh
    config = TrainConfig(rule="dtp", model="vgg", dataset="digits", model_options={"width": 4})
    resolve(config)
    assert config.model_options["batch_norm"] is False and config.model_options["activation"] == "tanh"


@pytest.mark.parametrize("rule,options", [("l_drl", {}), ("dtp", {}), ("ddtp", {}),
                                          ("iterative_dtp", {"input_iters": 1, "output_iters": 1}),
                                          ("l_drl", {"conv_decoder": "activation_below"})])
def test_a_few_steps_on_digits_reduce_the_loss(rule, options):
    from fa_rules.core.trainer import apply_updates, declared_weight_decay, make_optimizers

    torch.manual_seed(0)
    net = get_registry().model("lenet").make((1, 8, 8), (10,), activation="tanh")
    r = get_registry().rule(rule).make(**options)
    params, state = r.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    x, y = _digits(256, torch.float32)
    optimizers = make_optimizers(TrainConfig(lr=3e-3), params)
    losses = []
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        updates, state, metrics = r.step(net, params, state, Batch(x[idx], y[idx], seed=step))
        apply_updates(r, params, updates, optimizers, declared_weight_decay(rule, r, net, params))
        losses.append(float(metrics["loss"]))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)


def test_cli_trains_l_drl_on_lenet_above_chance(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--rule", "l_drl", "--model", "lenet", "--dataset", "digits",
                                      "--epochs", "1", "--batch-size", "16", "--lr", "0.003", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.3, summary["test_accuracy"]  # chance is 0.1
    assert len(summary["feedback_recon_error"]) == 4  # decoders of the second conv and the three fc blocks


# -- the suites ------------------------------------------------------------------------------------------
def test_the_suites_are_valid_in_both_forms():
    from fa_rules import benchmark as bench

    fashion = bench.load_suite(ROOT / "benchmarks" / "fashion_mnist_tp_conv.toml")
    quick = bench.load_suite(ROOT / "benchmarks" / "fashion_mnist_tp_conv.toml", quick=True)
    assert fashion.settings["dataset"] == "fashion_mnist" and quick.settings["dataset"] == "digits"
    cells = bench.plan_cells(fashion)
    assert len(cells) == 10 * 3 and len(bench.plan_cells(quick)) == 4
    vgg = [c.config for c in cells if c.entry.label.endswith("_svgg")]
    assert len(vgg) == 15 and all(c.model == "simple_vgg" and c.model_options["width_multiplier"] == 0.125 for c in vgg)
    paper = bench.plan_cells(bench.load_suite(ROOT / "benchmarks" / "cifar10_simple_vgg_ldrl.toml"))
    ldrl = next(c.config for c in paper if c.entry.name == "l_drl")
    assert (ldrl.model, ldrl.model_options, ldrl.epochs, ldrl.batch_size) == (
        "simple_vgg", {"activation": "elu", "width_multiplier": 1.0}, 90, 128)
    # Ernoult et al.'s per-layer noise and iterations, five decoders (conv 2-5 and the Linear layer)
    per_decoder = [item.split(":") for item in ldrl.rule_options["feedback_per_decoder"].split(",")]
    assert [float(p[1]) for p in per_decoder] == [0.4, 0.4, 0.2, 0.2, 0.08]
    assert [int(p[2]) for p in per_decoder] == [20, 30, 35, 55, 20]


def test_the_fashion_mnist_suite_runs_its_quick_form_on_digits(tmp_path):
    """`fa-rules benchmark benchmarks/fashion_mnist_tp_conv.toml --quick`: backprop, DTP and L-DRL on
    LeNet and L-DRL on SimpleVGG at 1/8 width, one epoch of digits, every cell finishing with an
    angle to backprop's update and the interleaved step-time ratio, and the report written."""
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ROOT / "benchmarks" / "fashion_mnist_tp_conv.toml"),
                                      "--quick", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = {r["rule"]: r for r in json.loads((out / "results.json").read_text())}  # "rule": the label
    assert set(rows) == {"backprop", "dtp", "l_drl", "l_drl_svgg"}
    assert all(r["status"] == "ok" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    assert rows["l_drl_svgg"]["model"] == "simple_vgg" and rows["dtp"]["model"] == "lenet"
    for label in ("dtp", "l_drl", "l_drl_svgg"):
        angles = rows[label]["alignment_angle_per_block_deg"]
        # the output block gets its true gradient (angle about 0), the blocks below targets (angles above 1)
        assert angles and all(0 <= a < 180 for a in angles) and max(angles) > 1, (label, angles)
    assert rows["backprop"]["alignment_angle_deg"] == pytest.approx(0.0, abs=1e-3)
    assert rows["backprop"]["interleaved_step_ratio"] == 1.0 and rows["dtp"]["interleaved_step_ratio"] > 1.0
    assert "l_drl_svgg" in (out / "report.md").read_text()


def test_the_paper_setting_suite_runs_its_quick_form_on_a_cifar_format_file_set(tmp_path):
    _write_cifar(tmp_path / "data" / "cifar-10-batches-py", per_batch=2)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ROOT / "benchmarks" / "cifar10_simple_vgg_ldrl.toml"),
                                      "--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((out / "results.json").read_text())
    assert {r["rule"] for r in rows} == {"backprop", "l_drl"}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert all(r["model"] == "simple_vgg" for r in rows)


def test_the_flop_count_of_a_step_is_within_1_5x_of_its_floor():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tp_conv_costs", ROOT / "benchmarks" / "tp_conv_costs.py")
    costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(costs)
    net = get_registry().model("lenet").make((1, 8, 8), (10,), activation="tanh")
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    forward, decoder = costs.block_and_decoder_flops(net, net.init_params(), x)
    assert forward[1] == decoder[1] > 0  # a transposed conv costs what its conv costs
    backprop = costs.step_flops("backprop", net, x, y)
    assert backprop == 3 * sum(forward) - forward[0]
    for rule in ("dtp", "l_drl", "ddtp"):
        measured, floor = costs.step_flops(rule, net, x, y), costs.floor_flops(rule, {}, net, forward, decoder)
        assert floor <= measured <= 1.5 * floor, (rule, measured, floor)
