"""Feature alignment on convolutional encoders (`lenet`, `vgg`): one step of `local_fa` (Algorithm 2,
both flows) and of `feature_alignment` (Algorithm 1), and `local_fa`'s reconstruction (Algorithm 3),
each against a float64 reference written here from the paper's equations with the flow's steps
spelled out (transposed convolutions, max-unpooling with the data's indices, the activation's
derivative); conformance on the new models and settings; memory flat in depth; the command line;
`dfc`'s refusal of convolutional models."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Batch, SavedTensorsProbe, UserError
from fa_rules.core.trainer import TrainConfig
from fa_rules.models import lenet, vgg
from fa_rules.plugins.manager import get_registry
from fa_rules.rules.feature_alignment import feature_alignment
from fa_rules.rules.local_feature_alignment import local_feature_alignment
from fa_rules.runs import resolve
from fa_rules.testing import CHECKS, assert_conformant, run_check
from fa_rules import testing
from test_cli_errors import run_main

TOL = dict(rtol=1e-10, atol=1e-10)
LATENT = 6
# (kind, padding, ends in a 2x2 max pool) per block, as the zoo builds them; asinh on every block
# but the latent one (identity)
LENET = [("conv", 2, True), ("conv", 2, True), ("linear", 0, False), ("linear", 0, False), ("linear", 0, False)]
VGG = [("conv", 1, False), ("conv", 1, True)] * 3 + [("linear", 0, False)]


def _network(model: str):
    torch.manual_seed(0)
    if model == "lenet":
        return lenet((1, 8, 8), (LATENT,), activation="asinh").double(), LENET
    return vgg((1, 8, 8), (LATENT,), width=2, activation="asinh", batch_norm=False).double(), VGG


def _init(rule, network):
    """`(params, state)` of `rule` on `network` from its initial weights (the feedback drawn with seed 1)."""
    return rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))


def _data(n=5):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


# -- the paper's equations, written out ------------------------------------------------------------
class Ref:
    """Block i of the reference encoder: W_i, b_i, its layer map, the transpose, the activation."""

    def __init__(self, params: dict, spec: list):
        self.spec = spec
        self.w = [params[f"blocks.{i}.layer.weight"].detach().clone().requires_grad_(True) for i in range(len(spec))]
        self.b = [params[f"blocks.{i}.layer.bias"].detach().clone().requires_grad_(True) for i in range(len(spec))]

    def last(self, i):
        return i == len(self.spec) - 1

    def layer(self, i, r, w=None, b=None):
        """a = W * r + b (a convolution with the block's padding, or a matrix product)."""
        kind, pad, _ = self.spec[i]
        w, b = (self.w[i] if w is None else w), (self.b[i] if b is None else b)
        return F.conv2d(r, w, b, padding=pad) if kind == "conv" else r.flatten(1) @ w.T + b

    def layer_t(self, i, e, like, w=None):
        """W^T e: the transposed convolution of the error (or e W), shaped like the block's input."""
        kind, pad, _ = self.spec[i]
        w = self.w[i] if w is None else w
        return (F.conv_transpose2d(e, w, padding=pad) if kind == "conv" else e @ w).reshape(like.shape)

    def act(self, i, a):
        return a if self.last(i) else torch.asinh(a)

    def act_prime(self, i, a):
        return torch.ones_like(a) if self.last(i) else 1 / torch.sqrt(1 + a * a)

    def act_inverse(self, i, h):
        return h if self.last(i) else torch.sinh(h)

    def pooled(self, i):
        return self.spec[i][2]


def _pool_indices(a):
    """Where the data's 2x2 max pool takes its maxima."""
    return F.max_pool2d(a, 2, return_indices=True)[1]


def _pool_at(a, indices):
    """The 2x2 pool of `a` at fixed positions: the window sums of `a` masked to those positions."""
    mask = F.max_unpool2d(torch.ones(indices.shape, dtype=a.dtype), indices, 2, output_size=a.shape[-2:])
    return 4 * F.avg_pool2d(a * mask, 2)


def _unpool(e, indices, like):
    return F.max_unpool2d(e, indices, 2, output_size=like.shape[-2:])


def _reference_block_output(ref, i, x):
    """(x_{l+1}, the data's pool indices or None) with no graph."""
    with torch.no_grad():
        h = ref.act(i, ref.layer(i, x))
        if not ref.pooled(i):
            return h, None
        indices = _pool_indices(h)
        return _pool_at(h, indices), indices


def reference_local_step(ref, x, seed, steps, tau, flow):
    """Algorithm 2: per block, z = f(x_l), r <- r - tau d/dr 1/2||z - f(r)||^2 (T steps, from a uniform
    start), C_l = mean (x_l - r)^2, the block's update dC_l/dtheta_l; x_{l+1} the block's output."""
    g = torch.Generator().manual_seed(seed)
    grads, losses = {}, []
    h = x
    for i in range(len(ref.spec)):
        out, indices = _reference_block_output(ref, i, h)
        r = torch.rand(h.shape, generator=g, dtype=torch.float64)
        if flow == "layer":  # f = W * r + b: the step is tau W^T (z - f(r))
            z = ref.layer(i, h)
            for _ in range(steps):
                r = r + tau * ref.layer_t(i, z - ref.layer(i, r), h)
        else:  # f = pool(asinh(W * r + b)) at the data's maxima: unpool, times asinh', then W^T
            def f(r):
                a = ref.layer(i, r)
                return a, (_pool_at(ref.act(i, a), indices) if indices is not None else ref.act(i, a))

            z = f(h)[1]
            for _ in range(steps):
                a, fr = f(r)
                e = z - fr
                if indices is not None:
                    e = _unpool(e, indices, a)
                r = r + tau * ref.layer_t(i, e * ref.act_prime(i, a), h)
        c = (h - r).pow(2).mean()
        gw, gb = torch.autograd.grad(c, [ref.w[i], ref.b[i]])
        grads[f"blocks.{i}.layer.weight"], grads[f"blocks.{i}.layer.bias"] = gw, gb
        losses.append(c.detach())
        h = out
    return grads, losses


def reference_reconstruction(ref, x, seed, steps, tau, unpool):
    """Algorithm 3, flow=layer: encode x; from the latent down, where the block pools copy each value
    over its 2x2 window (`nearest`) or max-unpool with the data's indices, undo asinh (sinh), run the
    layer's flow from a uniform start."""
    inputs, pools, h = [], [], x
    for i in range(len(ref.spec)):
        inputs.append(h)
        with torch.no_grad():
            pre = ref.act(i, ref.layer(i, h))
        h, indices = _reference_block_output(ref, i, h)
        pools.append((indices, pre))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in reversed(range(len(ref.spec))):
            indices, pre = pools[i]
            if indices is not None:
                h = _unpool(h, indices, pre) if unpool == "indices" else h.repeat_interleave(2, -2).repeat_interleave(2, -1)
            target = ref.act_inverse(i, h)
            r = torch.rand(inputs[i].shape, generator=g, dtype=torch.float64)
            for _ in range(steps):
                r = r + tau * ref.layer_t(i, target - ref.layer(i, r), inputs[i])
            h = r
    return h.reshape(x.shape)


def reference_global_step(ref, x, seed, steps, tau):
    """Algorithm 1: z = E(x), r <- r - tau d/dr 1/2||z - E(r)||^2 with the step spelled out block by
    block (W^T, asinh', max-unpooling with the data's indices), C = mean (x - r)^2, dC/dtheta."""
    indices, h = [], x
    for i in range(len(ref.spec)):
        with torch.no_grad():
            a = ref.act(i, ref.layer(i, h))
        indices.append(_pool_indices(a) if ref.pooled(i) else None)
        h = _reference_block_output(ref, i, h)[0]

    def encode(r):
        ins, pres, h = [], [], r
        for i in range(len(ref.spec)):
            ins.append(h)
            a = ref.layer(i, h)
            pres.append(a)
            h = ref.act(i, a)
            if indices[i] is not None:
                h = _pool_at(h, indices[i])
        return h, ins, pres

    z = encode(x)[0]
    r = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(steps):
        out, ins, pres = encode(r)
        e = z - out
        for i in reversed(range(len(ref.spec))):
            if indices[i] is not None:
                e = _unpool(e, indices[i], pres[i])
            e = ref.layer_t(i, e * ref.act_prime(i, pres[i]), ins[i])
        r = r + tau * e
    c = (x - r).pow(2).mean()
    grads = torch.autograd.grad(c, ref.w + ref.b)
    n = len(ref.spec)
    return ({**{f"blocks.{i}.layer.weight": grads[i] for i in range(n)},
             **{f"blocks.{i}.layer.bias": grads[n + i] for i in range(n)}}, c.detach())


# -- the rules against the references -------------------------------------------------------------
@pytest.mark.parametrize("model", ["lenet", "vgg"])
@pytest.mark.parametrize("flow", ["layer", "block"])
def test_local_fa_step_equals_algorithm_2_through_conv_and_pool(model, flow):
    network, spec = _network(model)
    rule = local_feature_alignment(steps=2, tau=0.3, init="uniform", flow=flow)
    params, state = _init(rule, network)
    batch = Batch(_data(), None, seed=5)
    updates, _, metrics = rule.step(network, params, state, batch)
    grads, losses = reference_local_step(Ref(params["model"], spec), batch.x, batch.seed, 2, 0.3, flow)
    assert set(updates["model"]) == set(grads) == set(params["model"])
    for key, expected in grads.items():
        if key.endswith("weight"):
            assert expected.abs().max() > 1e-6, key  # every block learns
        torch.testing.assert_close(updates["model"][key], expected, **TOL, msg=key)
    for i, loss in enumerate(losses):
        torch.testing.assert_close(metrics[f"block{i}_loss"], loss, **TOL)
    torch.testing.assert_close(metrics["loss"], sum(losses), **TOL)


@pytest.mark.parametrize("model", ["lenet", "vgg"])
@pytest.mark.parametrize("unpool", ["nearest", "indices"])
def test_local_fa_reconstruction_equals_algorithm_3_through_the_pools(model, unpool):
    network, spec = _network(model)
    rule = local_feature_alignment(steps=2, tau=0.3, init="uniform", unpool=unpool)
    params, state = _init(rule, network)
    x = _data()
    x_hat = rule.reconstruct(network, params, state, x, torch.Generator().manual_seed(9))
    expected = reference_reconstruction(Ref(params["model"], spec), x, 9, 2, 0.3, unpool)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(x_hat, expected, **TOL)


@pytest.mark.parametrize("model", ["lenet", "vgg"])
def test_feature_alignment_step_equals_algorithm_1_through_conv_and_pool(model):
    network, spec = _network(model)
    rule = feature_alignment(steps=2, tau=0.3, init="uniform")
    params, state = _init(rule, network)
    batch = Batch(_data(), None, seed=5)
    updates, _, metrics = rule.step(network, params, state, batch)
    grads, loss = reference_global_step(Ref(params["model"], spec), batch.x, batch.seed, 2, 0.3)
    for key, expected in grads.items():
        torch.testing.assert_close(updates["model"][key], expected, **TOL, msg=key)
    assert max(g.abs().max() for g in grads.values()) > 1e-3
    torch.testing.assert_close(metrics["loss"], loss, **TOL)


def test_pool_positions_flow_takes_the_pools_maxima_at_the_flows_own_point():
    """From a zero start every window ties: torch's max pool sends the first step to each window's
    first position, so the two settings give different updates; without pooling they agree."""
    network, _ = _network("lenet")
    batch = Batch(_data(), None, seed=5)
    steps = {}
    for positions in ("data", "flow"):
        rule = local_feature_alignment(flow="block", pool_positions=positions)
        params, state = _init(rule, network)
        steps[positions] = rule.step(network, params, state, batch)[0]["model"]
    assert (steps["data"]["blocks.0.layer.weight"] - steps["flow"]["blocks.0.layer.weight"]).abs().max() > 1e-4
    torch.testing.assert_close(steps["data"]["blocks.4.layer.weight"], steps["flow"]["blocks.4.layer.weight"])


# -- conformance, the registry and the command line -----------------------------------------------
@pytest.fixture
def small_vgg(monkeypatch):
    """The conformance checks build `vgg` at width 4 (its default 32 costs seconds per check)."""
    from dataclasses import replace

    registry = get_registry()
    monkeypatch.setitem(registry.models, "vgg", replace(registry.models["vgg"], options={
        **registry.models["vgg"].options, "width": 4}))
    monkeypatch.setattr(testing, "models_to_check", lambda spec: ["vgg"])


@pytest.mark.parametrize("rule", ["local_fa", "feature_alignment"])
def test_vgg_encoders_are_conformant(rule, small_vgg):
    # (lenet is the conformance suite's own conv model; `learns` runs on an MLP there too)
    assert_conformant(rule)


@pytest.mark.parametrize("options", [{"flow": "block"}, {"flow": "block", "pool_positions": "flow"},
                                     {"unpool": "indices"}])
def test_the_pool_and_flow_settings_are_conformant_on_vgg(options, small_vgg):
    for check in CHECKS:
        if check != "learns":
            run_check("local_fa", check, options)


def test_local_fa_builds_lenet_and_vgg_as_encoders_with_asinh_and_no_batch_norm():
    for model in ("lenet", "vgg"):
        config = TrainConfig(rule="local_fa", model=model, dataset="digits", latent_dim=12)
        rule, _, build = resolve(config)
        network = build()
        assert rule.task == "reconstruct" and network.out_shape == (12,)
        assert config.model_options["activation"] == "asinh"
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    with pytest.raises(UserError, match="cannot invert block 0's BatchNorm2d.*batch_norm=false"):
        config = TrainConfig(rule="local_fa", model="vgg", model_options={"batch_norm": True})
        _, _, build = resolve(config)
        network = build()
        local_feature_alignment().init(network, {"model": network.init_params()}, torch.Generator())
    spec = get_registry().rule("local_fa")
    with pytest.raises(UserError, match="pool_positions' must be one of data, flow"):
        spec.make(pool_positions="nearest")
    with pytest.raises(UserError, match="pool_positions applies to flow=block"):
        spec.make(pool_positions="flow")  # (with flow=layer the pool is outside the flow)
    with pytest.raises(UserError, match="unpool applies to flow=layer"):
        spec.make(flow="block", unpool="indices")


def test_memory_of_local_fa_stays_flat_in_the_depth_of_a_vgg_encoder():
    """One step at 2 and 4 convs per stage (7 and 13 blocks): the peak of bytes saved for backward is
    one block's second-order graph, so the deeper encoder keeps no more."""
    peaks = {}
    for convs in (2, 4):
        torch.manual_seed(0)
        network = vgg((1, 16, 16), (8,), width=4, activation="asinh", batch_norm=False, convs_per_stage=convs)
        rule = local_feature_alignment()
        params, state = _init(rule, network)
        batch = Batch(torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(2)), None, seed=3)
        with SavedTensorsProbe() as probe:
            rule.step(network, params, state, batch)
        peaks[convs] = probe.peak
    assert peaks[2] > 0 and peaks[4] <= 1.2 * peaks[2], peaks


def test_cli_trains_local_fa_on_a_conv_encoder(tmp_path):
    model = "lenet"
    out = tmp_path / model
    result = CliRunner().invoke(app, ["train", "--rule", "local_fa", "--model", model, "--dataset", "digits",
                                      "--epochs", "1", "--batch-size", "128", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["model"] == model
    assert math.isfinite(summary["test_recon_mse"]) and summary["peak_saved_bytes"] > 0
    assert (out / "config.json").exists() and (out / "checkpoint.pt").exists()


def test_dfc_refuses_a_conv_model_in_one_line_saying_why(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, err = run_main(["train", "--rule", "dfc", "--model", "lenet", "--dataset", "digits", "--out", str(out)],
                         tmp_path, monkeypatch, capsys)
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert "does not support model 'lenet'" in err and "fully connected layers" in err
    from fa_rules.rules.deep_feedback_control import dfc

    network, _ = _network("lenet")  # a conv network handed over from Python: the same reason
    with pytest.raises(UserError, match="dfc supports MLPs only: .*fully connected"):
        dfc().init(network, {"model": network.init_params()}, torch.Generator())
