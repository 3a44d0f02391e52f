"""The backprop baselines of the feature alignment paper: `vae` and the least-squares `gan`."""

import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core.errors import UserError
from fa_rules.core.network import count_params
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.plugins.datasets import load_digits
from fa_rules.rules.generative_baselines import build_aux, gan, vae


def digits(n=256):
    d = load_digits()
    return d.train_x[:n], d.test_x


def vae_setup(beta=1.0, likelihood="bernoulli"):
    rule = vae(beta=beta, likelihood=likelihood)
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (8,), rule.heads(8, 10), depth=1, width=64, activation="tanh")
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    return rule, net, params, state


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_update_is_the_gradient_of_the_negative_elbo(likelihood):
    rule, net, params, state = vae_setup(beta=0.5, likelihood=likelihood)
    x = digits(8)[0]
    batch = Batch(x, None, seed=3)
    updates, _, metrics = rule.step(net, params, state, batch)
    # reference: plain autograd on the same parameters and the same eps
    model = {k: v.clone().requires_grad_(True) for k, v in params["model"].items()}
    dec = {k: v.clone().requires_grad_(True) for k, v in params["decoder"].items()}
    out = net.apply(model, x)
    eps = torch.randn(out["mu"].shape, generator=batch.generator())
    decoder = build_aux("decoder", net, 8)
    x_hat = decoder.apply(dec, out["mu"] + eps * (0.5 * out["logvar"]).exp())
    kl = -0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()).sum(1)
    if likelihood == "gaussian":
        nll = ((x - x_hat) ** 2).flatten(1).sum(1)
    else:
        nll = torch.nn.functional.binary_cross_entropy(x_hat, x, reduction="none").flatten(1).sum(1)
    loss = nll.add(0.5 * kl).mean()
    loss.backward()
    for k, p in model.items():
        assert torch.allclose(updates["model"][k], p.grad, atol=1e-5), k
    for k, p in dec.items():
        assert torch.allclose(updates["decoder"][k], p.grad, atol=1e-5), k
    assert abs(float(metrics["loss"]) - loss.item()) < 1e-4


def test_vae_negative_elbo_falls_and_it_reconstructs_and_samples():
    rule, net, params, state = vae_setup()
    x, test_x = digits()
    opt = make_optimizers(TrainConfig(lr=3e-3), params)
    losses = []
    for i in range(150):
        idx = torch.arange(i * 64, (i + 1) * 64) % x.shape[0]
        updates, state, metrics = rule.step(net, params, state, Batch(x[idx], None, seed=i))
        apply_updates(rule, params, updates, opt)
        losses.append(float(metrics["loss"]))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # measured: 45.0 -> 26.8
    x_hat = rule.reconstruct(net, params, state, test_x, torch.Generator())
    # measured 0.051; predicting the mean test image would leave 0.074, the untrained decoder 0.18
    assert float((x_hat - test_x).pow(2).mean()) < 0.8 * float(test_x.var(dim=0).mean())
    parts = rule.reconstruct(net, params, state, test_x[:4], torch.Generator(), stages=True)
    assert torch.equal(parts["latent"], net.apply(params["model"], test_x[:4])["mu"])
    samples = rule.sample(net, params, state, 6, torch.Generator().manual_seed(0))
    assert samples.shape == (6, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    again = rule.sample(net, params, state, 6, torch.Generator().manual_seed(0), latents=torch.zeros(2, 8))
    assert again.shape == (2, 1, 8, 8)
    with pytest.raises(UserError, match="not class-conditional"):
        rule.sample(net, params, state, 2, torch.Generator(), labels=torch.tensor([0, 1]))


def gan_setup():
    rule = gan(recon_steps=100, recon_lr=0.05)
    torch.manual_seed(0)
    net = zoo.mlp((1, 8, 8), (4,), rule.heads(4, 10), depth=1, width=32, activation="leaky_relu")
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    return rule, net, params, state


def test_gan_updates_move_the_discriminator_and_the_generator_the_right_way():
    """Toy case: real images are all ones. A small step along -update must widen D's gap between
    real and generated images (Eq. 8), and raise D on the generator's new images (Eq. 7)."""
    rule, net, params, state = gan_setup()
    x = torch.ones(16, 1, 8, 8)
    batch = Batch(x, None, seed=5)
    updates, _, metrics = rule.step(net, params, state, batch)
    z = torch.randn(16, 4, generator=batch.generator())  # the step's latents (its only draw)
    g_net = build_aux("generator", net, 4)

    def d(model, images):
        return net.apply(model, images)["d"].mean().item()

    fake = g_net.apply(params["generator"], z)
    assert abs(float(metrics["d_loss"]) - (((1 - net.apply(params["model"], x)["d"]) ** 2).mean()
                                           + ((-1 - net.apply(params["model"], fake)["d"]) ** 2).mean()).item()) < 1e-5
    lr = 1e-2
    stepped_d = {k: v - lr * updates["model"][k] for k, v in params["model"].items()}
    # D learns to separate: the gap between real and generated images widens
    assert d(stepped_d, x) - d(stepped_d, fake) > d(params["model"], x) - d(params["model"], fake)
    stepped_g = {k: v - lr * updates["generator"][k] for k, v in params["generator"].items()}
    assert d(params["model"], g_net.apply(stepped_g, z)) > d(params["model"], fake)
    assert set(updates) == {"model", "generator"}


def test_gan_learns_the_toy_distribution_and_reconstructs_by_latent_search():
    rule, net, params, state = gan_setup()
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 3:5] = 1.0  # every real image is one bar
    x = target.expand(64, -1, -1, -1)
    opt = make_optimizers(TrainConfig(lr=3e-3), params)
    before = rule.sample(net, params, state, 64, torch.Generator().manual_seed(0))
    for i in range(150):
        updates, state, _ = rule.step(net, params, state, Batch(x, None, seed=i))
        apply_updates(rule, params, updates, opt)
    after = rule.sample(net, params, state, 64, torch.Generator().manual_seed(0))
    err_before, err_after = float((before - target).pow(2).mean()), float((after - target).pow(2).mean())
    assert err_after < 0.3 * err_before, (err_before, err_after)
    # the MLP generator's batch norm evaluates with running statistics: one sample alone is the same
    # sample as in a batch, and the statistics have moved from their initial (0, 1)
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(rule.sample(net, params, state, 1, torch.Generator(), latents=z[:1]),
                          rule.sample(net, params, state, 3, torch.Generator(), latents=z)[:1], atol=1e-6)
    assert min(v.sub(1.0 if k.endswith("var") else 0.0).abs().max() for k, v in state["generator_stats"].items()) > 1e-2
    # reconstruction (paper, section 4): argmin_z ||x - G(z)||^2 beats G(0)
    probe = target.clone()
    g_zero = build_aux("generator", net, 4).apply(params["generator"], torch.zeros(1, 4), state["generator_stats"])
    x_hat = rule.reconstruct(net, params, state, probe, torch.Generator())
    assert float((x_hat - probe).pow(2).mean()) < float((g_zero - probe).pow(2).mean())


def test_gan_with_the_paper_discriminator_uses_the_table_12_generator():
    rule = gan()
    torch.manual_seed(0)
    net = zoo.paper_discriminator((1, 28, 28), (16,), rule.heads(16, 10))
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
    assert state == {"generator_stats": {}}  # the paper's generator normalises with batch statistics
    assert count_params(params["generator"]) == count_params(dict(zoo.gan_generator((16,), (1, 28, 28)).named_parameters()))
    assert count_params(params["model"]) == count_params(dict(zoo.paper_discriminator((1, 28, 28), (1,)).named_parameters()))
    samples = rule.sample(net, params, state, 1, torch.Generator().manual_seed(0))
    assert samples.shape == (1, 1, 28, 28)


def test_vae_needs_heads_and_gan_needs_one_head():
    encoder = zoo.mlp((1, 8, 8), (8,), depth=1, width=8)
    for rule in (vae(), gan()):
        with pytest.raises(UserError):
            rule.init(encoder, {"model": encoder.init_params()}, torch.Generator())
