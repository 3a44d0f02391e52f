"""Variational feature alignment (vfa) and VFA-GAN (vfa_gan): updates against an independent
autograd computation of Eq. 5-8, learning on digits, sampling, and the `sample` command."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules import models as zoo
from fa_rules.core.network import count_params
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.plugins.datasets import load_digits
from fa_rules.rules.variational_feature_alignment import (
    variational_feature_alignment as vfa,
    variational_feature_alignment_gan as vfa_gan,
)

Z = 3


def tiny_encoder(conditional=False):
    torch.manual_seed(0)
    heads = {"mu": Z, "logvar": Z, **({"cls": 4} if conditional else {})}
    return zoo.mlp((1, 4, 4), (Z,), heads, depth=1, width=6, activation="tanh")


def settings(**over):
    base = dict(steps=1, tau=1.0, init="zeros", squash="none", beta_schedule="uniform", beta=1.0, noise="std",
                orthogonal=False, clamp_weights=False, conditional=False, label_scale=3.0, class_weight=1.0)
    return {**base, **over}


def reference_encoder_grads(p, x, y, gen, s, classes=4):
    """Eq. 5/6 written out with plain torch.autograd on explicit tensors (no network view, no torch.func)."""
    n = x.shape[0]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    w1, b1 = leaves["blocks.0.layer.weight"], leaves["blocks.0.layer.bias"]

    def heads(inp):
        h = torch.tanh(inp.reshape(inp.shape[0], -1) @ w1.T + b1)
        out = {name: h @ leaves[f"heads.{name}.layer.weight"].T + leaves[f"heads.{name}.layer.bias"]
               for name in ("mu", "logvar", "cls") if f"heads.{name}.layer.weight" in leaves}
        return out

    # the rule's documented draw order: r_0 (random init only), eps, beta (uniform schedule only)
    r = torch.randn(x.shape, generator=gen) if s["init"] == "normal" else torch.zeros_like(x)
    eps = torch.randn((n, Z), generator=gen)
    beta = torch.rand((n,), generator=gen) if s["beta_schedule"] == "uniform" else torch.full((n,), s["beta"])
    out = heads(x)
    spread = torch.exp(0.5 * out["logvar"]) if s["noise"] == "std" else torch.exp(out["logvar"])
    z = out["mu"] + eps * spread
    r = r.requires_grad_(True)
    for _ in range(s["steps"]):
        o = heads(r)
        dist = 0.5 * (z - o["mu"]).pow(2).sum()
        if s["conditional"]:
            dist = dist + 0.5 * (F.one_hot(y, classes).float() - o["cls"]).pow(2).sum()
        (g,) = torch.autograd.grad(dist, r, create_graph=True)
        r = r - s["tau"] * g
    rec = (x - r).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + out["logvar"] - out["mu"].pow(2) - out["logvar"].exp()).sum(1)
    loss = (rec + beta * kl).mean()
    if s["conditional"]:
        loss = loss + s["class_weight"] * F.cross_entropy(out["cls"], y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads)), loss.detach()


@pytest.mark.parametrize("over", [
    {},                                                                      # the paper's settings
    {"init": "normal", "steps": 2, "tau": 0.5},                              # random start, two flow steps
    {"noise": "variance", "beta_schedule": "fixed", "beta": 0.3, "conditional": True},
])
def test_vfa_update_equals_an_independent_autograd_reference(over):
    s = settings(**over)
    net = tiny_encoder(s["conditional"])
    rule = vfa(**s)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    x, y = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 1])
    batch = Batch(x, y, seed=7)
    updates, _, metrics = rule.step(net, params, state, batch)
    ref, ref_loss = reference_encoder_grads(params["model"], x, y, batch.generator(), s)
    assert set(updates) == {"model"}
    for k, g in ref.items():
        assert torch.allclose(updates["model"][k], g, atol=1e-5, rtol=1e-4), k
    assert abs(float(metrics["loss"]) - float(ref_loss)) < 1e-4 * max(1.0, float(ref_loss))
    assert max(g.abs().max() for g in ref.values()) > 1e-3  # the comparison is not between zeros


def _digits_batch(n=256):
    d = load_digits()
    return d.train_x[:n], d.train_y[:n], d.test_x, d.test_y


def _train(rule, net, steps, lr=3e-3, n=256, seed=0, batch_size=64):
    x, y, _, _ = _digits_batch(n)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(seed + 1))
    opt = make_optimizers(TrainConfig(lr=lr), params)
    history = []
    for i in range(steps):
        idx = torch.arange(i * batch_size, (i + 1) * batch_size) % n
        updates, state, metrics = rule.step(net, params, state, Batch(x[idx], y[idx], seed=i))
        apply_updates(rule, params, updates, opt)
        history.append({k: float(v) for k, v in metrics.items()})
    return params, state, history


def _mean(history, key, sl):
    rows = history[sl]
    return sum(r[key] for r in rows) / len(rows)


def test_vfa_loss_falls_and_the_flow_reconstructs_unseen_digits():
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (8,), {"mu": 8, "logvar": 8}, depth=1, width=64, activation="tanh")
    rule = vfa()  # paper settings: orthogonal init, weight clamp, beta ~ U(0, 1), tau = T = 1
    _, _, test_x, _ = _digits_batch()
    untrained, state0 = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    mse0 = float((rule.reconstruct(net, untrained, state0, test_x, torch.Generator()) - test_x).pow(2).mean())
    params, state, history = _train(rule, net, 150)
    first, last = _mean(history, "loss", slice(0, 10)), _mean(history, "loss", slice(-10, None))
    assert last < 0.5 * first, (first, last)  # measured: 21.5 -> 5.3
    x_hat = rule.reconstruct(net, params, state, test_x, torch.Generator().manual_seed(0))
    mse = float((x_hat - test_x).pow(2).mean())
    # measured 0.216 untrained -> 0.046; predicting the mean test image would leave 0.074 (pixel variance)
    assert mse < 0.3 * mse0 and mse < 0.7 * float(test_x.var(dim=0).mean()), (mse0, mse)
    samples = rule.sample(net, params, state, 10, torch.Generator().manual_seed(0))
    assert samples.shape == (10, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    assert samples.std(dim=0).mean() > 0.01  # different latents give different images


def test_conditional_vfa_draws_the_requested_class():
    torch.manual_seed(0)
    rule = vfa(conditional=True)
    net = zoo.mlp((1, 8, 8), (8,), rule.heads(8, 10), depth=1, width=64, activation="tanh")
    params, state, history = _train(rule, net, 150)
    assert history[-1]["class_loss"] < 0.5 * history[0]["class_loss"]
    labels = torch.arange(10).repeat(5)
    samples = rule.sample(net, params, state, 50, torch.Generator().manual_seed(0), labels=labels)
    predicted = net.apply(params["model"], samples)["cls"].argmax(1)
    assert (predicted == labels).float().mean() > 0.5  # chance is 0.1


def test_vfa_gan_encoder_update_is_vfas_and_generator_discriminator_follow_eq_7_8():
    torch.manual_seed(0)
    s = settings(perceptual_weight=0.25)
    net = tiny_encoder()
    gan_rule, plain = vfa_gan(**s), vfa(**{k: v for k, v in s.items() if k != "perceptual_weight"})
    params, state = gan_rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    assert set(params) == {"model", "generator", "discriminator"}
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    batch = Batch(x, None, seed=11)
    updates, _, metrics = gan_rule.step(net, params, state, batch)
    plain_updates, _, _ = plain.step(net, {"model": params["model"]}, state, batch)
    for k in params["model"]:  # the encoder receives nothing from G or D (Eq. 6)
        assert torch.equal(updates["model"][k], plain_updates["model"][k]), k

    # independent reference for Eq. 7-8, given the flow output r_hat the encoder produced
    from fa_rules.rules.generative_baselines import build_aux

    g_net, d_net = build_aux("refiner", net), build_aux("discriminator", net)
    gen = batch.generator()
    eps = torch.randn((6, Z), generator=gen)
    out = net.apply(params["model"], x)
    z = out["mu"] + eps * torch.exp(0.5 * out["logvar"])
    r = torch.zeros_like(x).requires_grad_(True)
    (g,) = torch.autograd.grad(0.5 * (z - net.apply(params["model"], r)["mu"]).pow(2).sum(), r)
    r_hat = (r - g).detach()
    gp = {k: v.clone().requires_grad_(True) for k, v in params["generator"].items()}
    dp = {k: v.clone().requires_grad_(True) for k, v in params["discriminator"].items()}
    fake = g_net.apply(gp, r_hat)
    o = net.apply(params["model"], fake)
    loss_g = ((1 - d_net.apply(params["discriminator"], fake)) ** 2).mean() + 0.25 * (
        (out["mu"].detach() - o["mu"]).pow(2).sum(1) + (out["logvar"].exp().detach() - o["logvar"].exp()).pow(2).sum(1)
    ).mean()
    ref_g = torch.autograd.grad(loss_g, list(gp.values()))
    loss_d = ((1 - d_net.apply(dp, x)) ** 2).mean() + ((-1 - d_net.apply(dp, fake.detach())) ** 2).mean()
    ref_d = torch.autograd.grad(loss_d, list(dp.values()))
    for k, ref in zip(gp, ref_g):
        assert torch.allclose(updates["generator"][k], ref, atol=1e-5, rtol=1e-4), k
    for k, ref in zip(dp, ref_d):
        assert torch.allclose(updates["discriminator"][k], ref, atol=1e-5, rtol=1e-4), k
    assert abs(float(metrics["g_loss"]) - loss_g.item()) < 1e-5
    assert abs(float(metrics["d_loss"]) - loss_d.item()) < 1e-5

    # reconstruct(stages=True): the flow output, and the generator applied to it
    parts = gan_rule.reconstruct(net, params, state, x, torch.Generator(), stages=True)
    assert set(parts) == {"latent", "r_hat", "x_hat"}
    evaluated = g_net.apply(params["generator"], parts["r_hat"], state["generator_stats"])  # running statistics
    assert torch.allclose(parts["x_hat"], evaluated, atol=1e-6)
    assert torch.allclose(parts["latent"], out["mu"])
    assert torch.equal(gan_rule.reconstruct(net, params, state, x, torch.Generator()), parts["x_hat"])


def test_vfa_gan_builds_the_paper_networks_for_28_pixel_images():
    rule = vfa_gan(orthogonal=False)
    torch.manual_seed(0)
    net = zoo.paper_encoder((1, 28, 28), (16,), rule.heads(16, 10))
    params, _ = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    generator, discriminator = zoo.fa_generator((1, 28, 28)), zoo.paper_discriminator((1, 28, 28), (1,))
    assert {k: v.shape for k, v in params["generator"].items()} == {k: v.shape for k, v in generator.named_parameters()}
    assert count_params(params["discriminator"]) == count_params(dict(discriminator.named_parameters()))
    bound = max(v.abs().max() for k, v in params["generator"].items() if k.endswith("layer.weight"))
    assert bound <= 1 / (1 * 7 * 7) ** 0.5 + 1e-6  # PyTorch's default init range, drawn from the rule's generator


def test_unconditional_vfa_refuses_labels():
    from fa_rules.core.errors import UserError

    net = tiny_encoder()
    rule = vfa(**settings())
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator())
    with pytest.raises(UserError, match="conditional"):
        rule.sample(net, params, state, 2, torch.Generator(), labels=torch.tensor([1, 2]))


def test_sample_command_writes_grids_of_the_right_size(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--rule", "vfa_gan", "--dataset", "digits", "--epochs", "1", "--width", "16",
                                 "--latent-dim", "4", "--batch-size", "256", "--out", str(run), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["test_recon_mse"] < 1 and set(summary["params_by_group"]) == {"model", "generator", "discriminator"}
    # the epoch record keeps the means of the step's other metrics: both adversarial losses, the KL
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train_g_loss", "train_d_loss", "train_kl", "train_recon_mse"} <= set(row)
    assert 0 < row["train_d_loss"] < 10 and 0 < row["train_g_loss"] < 10 and row["train_kl"] > 0

    result = runner.invoke(app, ["sample", str(run), "--num", "16", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    # 8x8 digits are enlarged 4x to 32 px; 4 per row with 2 px padding: 4 * 34 + 2
    assert Image.open(tmp_path / "s.png").size == (138, 138)

    result = runner.invoke(app, ["sample", str(run), "--num", "9", "--interpolate", "--out", str(tmp_path / "i.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "i.png").size == (3 * 34 + 2, 3 * 34 + 2)

    result = runner.invoke(app, ["sample", str(run), "--label", "3"])
    assert result.exit_code != 0 and "conditional" in str(result.exception)


def test_vfa_gan_diagnostics_reads_a_trained_run_and_refuses_other_rules(tmp_path):
    import importlib.util
    from pathlib import Path

    from fa_rules.core.errors import UserError

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("vfa_gan_diagnostics", root / "benchmarks" / "vfa_gan_diagnostics.py")
    diagnostics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnostics)

    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]).remainder(2).float()[None, None]
    assert diagnostics.high_frequency_energy(checkerboard) == 16.0  # |Laplacian| = 4 at every pixel
    assert diagnostics.high_frequency_energy(torch.full((2, 1, 8, 8), 0.7)) < 1e-12

    runner = CliRunner()
    runs = {}
    for rule in ("vfa_gan", "vae"):
        runs[rule] = tmp_path / rule
        result = runner.invoke(app, ["train", "--rule", rule, "--dataset", "digits", "--epochs", "1", "--width", "16",
                                     "--latent-dim", "4", "--batch-size", "256", "--out", str(runs[rule]), "-q"])
        assert result.exit_code == 0, result.output
    r = diagnostics.diagnose(runs["vfa_gan"], num=50, seed=0)
    assert r["num"] == 50 and r["perceptual_weight"] == 0.01 and r["perceptual"] > 0
    assert set(r["discriminator"]) == set(r["high_frequency"]) == {"x", "r_hat", "G(r_hat)", "samples"}
    # mean (D - 1)^2 >= (mean D - 1)^2: the adversarial term and the mean output come from the same D
    assert r["adversarial"] >= (r["discriminator"]["G(r_hat)"] - 1) ** 2 - 1e-6
    assert all(0 < v < 1 for v in r["mse"].values())
    with pytest.raises(UserError, match="vae run"):
        diagnostics.diagnose(runs["vae"], num=10, seed=0)
