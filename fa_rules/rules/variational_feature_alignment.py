"""Variational feature alignment (VFA) and VFA-GAN: feature alignment as a generative process.

Farias & Maziero, "Feature alignment as a generative process", Frontiers in Artificial Intelligence
(2023): section 3.3 (VFA, Eq. 5, Figure 3), section 3.4 (VFA-GAN, Eq. 6-8, Figure 4), section 4
(settings), section 5 (Tables 2-6); network tables 7-12 in the arXiv version's appendix.

`vfa`. The encoder E (the model) ends in a hidden block with linear heads `mu` and `logvar` (and
`cls` for conditional generation). There is no decoder: the encoder inverts itself through the
gradient flow of feature alignment (`fa_rules.core.gradient_flow`, Eq. 1-2):

    mu_x, logvar_x = E(x)
    z_x = mu_x + eps * sigma_x,  eps ~ N(0, I)           reparameterisation on the data side only
    r_hat = r_0 - tau * d/dr 1/2 ||z_x - mu(r)||^2        T = `steps` Euler steps; z_r = mu(r) has no noise
    L = ||x - r_hat||^2 + beta * KL(N(mu_x, sigma_x^2) || N(0, I))        (Eq. 5, Eq. 6)

per example (the squared error summed over the example's pixels: the scale the KL is balanced
against in a VAE; `feature_alignment`'s mean per pixel would let the KL dominate), averaged over the
batch; the gradient reaches theta through the target z_x and through every flow step (second order). Sampling runs the same flow towards z ~ N(0, I); reconstruction
towards mu_x.

`vfa_gan` adds two groups the engine optimises like the model: a generator G refining r_hat
(Table 11, image -> image) and a least-squares discriminator D (Table 10):

    L_E = Eq. 6 (as above; the encoder receives nothing from G or D)
    L_G = mean (1 - D(G(r_hat)))^2 + lambda (||mu(x) - mu(G(r_hat))||^2
                                             + ||sigma^2(x) - sigma^2(G(r_hat))||^2)    (Eq. 7)
    L_D = mean (1 - D(x))^2 + mean (-1 - D(G(r_hat)))^2                                 (Eq. 8)

r_hat is the encoder's training flow output (a constant for G and D); the perceptual terms use the
encoder's mu and sigma^2 heads with the encoder held fixed. Samples and reconstructions are G(r_hat).

Settings (paper defaults; where the paper is ambiguous the choice is a setting):

- `steps=1, tau=1.0`: "tau = 1 ... at one-shot T = 1" (section 4).
- `init="zeros"`, `squash="none"`: the flow's start and the map of r_hat into the data range, as for
  `feature_alignment` (zeros follows the authors' code; `uniform`/`normal` are the paper's random
  start; `squash=sigmoid` is the authors' code).
- `beta_schedule="uniform"`: beta ~ U(0, 1) drawn per example (section 3.4, section 4);
  `beta_schedule="fixed"` uses `beta` for every example (Eq. 5 with a constant).
- `noise="std"`: z = mu + eps * sigma (Kingma & Welling); section 3.3 prints z = mu + eps * sigma^2,
  available as `noise="variance"`. Eq. 5 prints "- beta KL"; Eq. 6 and every VAE add it, as here.
- `orthogonal=True`: orthogonal initialisation of the encoder (and of G) (section 4).
- `clamp_weights=True`: encoder weights clamped to +-sqrt(2) after each step (Eq. 9).
- `conditional=False`: with `True` a linear `cls` head sits beside `mu`/`logvar` and is trained by
  cross-entropy (weight `class_weight`); the flow then also aligns cls(r) with the one-hot label
  (z ~ Q(z, c), section 3.4), and sampling for class k aligns it with `label_scale` * one-hot(k)
  ("a higher value for the one-hot vector during inference"; default 2, which kept digits sharp
  where 3 saturated them; `fa-rules sample --label-scale` overrides it). Reconstruction uses the one-hot of
  the predicted class.
- `perceptual_weight=0.01`: lambda of Eq. 7 (vfa_gan).

Auxiliary networks follow the encoder: paper encoders get Tables 10 and 11, `mlp` encoders MLPs with
the encoder's hidden widths (cheap tests, 8x8 digits); the MLP generator keeps Table 11's batch norm
and its running statistics in the rule's state (`generator_stats`) for sampling and reconstruction.
Each step draws, from `batch.generator()` and in this order: r_0 (only for a random `init`),
eps (B, Z), beta (B,) (only for `uniform`).

Extensions used by the commands (see `generative_baselines`): `reconstruct(..., stages=True)`
returns `{"latent": mu_x, "r_hat": r_hat, "x_hat": reconstruction}` (for vfa_gan `x_hat` is
G(r_hat), for vfa it is r_hat), and `sample(..., latents=z)` decodes the given latents.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fa_rules.core import Rule, RuleSpec, UserError, clamp, constrained, grad_and_value, hookimpl
from fa_rules.core.gradient_flow import gradient_flow, initial_input, orthogonal_init
from fa_rules.core.gradient_flow import squash as squash_output
from fa_rules.core.rule import MAX_SCALE, NON_NEGATIVE, Range
from fa_rules.rules.feature_alignment import FLOW_RANGES
from fa_rules.rules.generative_baselines import (
    AuxNetworks,
    build_aux,
    gaussian_kl,
    head_width,
    least_squares,
    model_device,
    squared_error,
    standard_normal,
)

WEIGHT_BOUND = math.sqrt(2.0)  # Eq. 9
BETA_SCHEDULES = ("uniform", "fixed")
NOISES = ("std", "variance")


def _options(gan: bool) -> dict:
    options = {"steps": 1, "tau": 1.0, "init": "zeros", "squash": "none", "beta_schedule": "uniform",
               "beta": 1.0, "noise": "std", "orthogonal": True, "clamp_weights": True,
               "conditional": False, "label_scale": 2.0, "class_weight": 1.0}
    if gan:
        options["perceptual_weight"] = 0.01
    return options


def _ranges(gan: bool) -> dict:
    """The options' declared ranges: weights >= 0 (a negative weight rewards the term it should
    penalise); `label_scale` either way (`fa-rules sample --label-scale` may push the class signal)."""
    ranges = {**FLOW_RANGES, "beta_schedule": BETA_SCHEDULES, "beta": NON_NEGATIVE, "noise": NOISES,
              "label_scale": Range(-MAX_SCALE, MAX_SCALE), "class_weight": NON_NEGATIVE}
    if gan:
        ranges["perceptual_weight"] = NON_NEGATIVE
    return ranges


def perceptual_distance(mu: torch.Tensor, var: torch.Tensor, out: dict) -> torch.Tensor:
    """Eq. 7's perceptual term: `|mu - mu'|^2 + |var - var'|^2` between the encoder's posterior of
    the real images (`mu`, `var`) and of the refined ones (`out`), averaged over the batch."""
    return ((mu - out["mu"]).pow(2).sum(1) + (var - out["logvar"].exp()).pow(2).sum(1)).mean()


def _variational_fa(
    name: str,
    gan: bool,
    steps: int,
    tau: float,
    init: str,
    squash: str,
    beta_schedule: str,
    beta: float,
    noise: str,
    orthogonal: bool,
    clamp_weights: bool,
    conditional: bool,
    label_scale: float,
    class_weight: float,
    perceptual_weight: float = 0.0,
) -> Rule:
    def heads(latent: int, num_classes: int) -> dict[str, int]:
        out = {"mu": latent, "logvar": latent}
        if conditional:
            if num_classes < 2:
                raise UserError(f"{name} with conditional=true needs a labelled dataset")
            out["cls"] = num_classes
        return out

    def build(network):
        if not {"mu", "logvar"} <= set(network.heads):
            raise UserError(f"{name} needs an encoder with mu and logvar heads")
        return {"generator": build_aux("refiner", network), "discriminator": build_aux("discriminator", network)} if gan else {}

    aux = AuxNetworks(build)

    # -- the flow: r_hat such that the encoder's latent of r_hat matches the target --------------
    def latent_of(out: dict) -> dict:
        return {k: out[k] for k in (("mu", "cls") if conditional else ("mu",))}

    def target(mu: torch.Tensor, onehot: torch.Tensor | None) -> dict:
        return {"mu": mu, "cls": onehot} if conditional else {"mu": mu}

    def invert(network, model, tgt: dict, r0: torch.Tensor) -> torch.Tensor:
        r = gradient_flow(lambda r: latent_of(network.apply(model, r)), tgt, r0, steps, tau)
        return squash_output(squash, r)

    def one_hot(network, labels, scale):
        return F.one_hot(labels, head_width(network, "cls")).to(torch.get_default_dtype()) * scale

    def refine(network, params, state, r_hat):  # evaluation: running statistics where kept
        return aux(network)["generator"].apply(params["generator"], r_hat, state["generator_stats"]) if gan else r_hat

    # -- init / step ------------------------------------------------------------------------------
    def init_fn(network, params, generator):
        nets = aux(network)
        model = orthogonal_init(params["model"], generator) if orthogonal else params["model"]
        out, state = {**params, "model": model}, {}
        if gan:
            device = model_device(params)
            out["generator"] = nets["generator"].init_params(generator, device, orthogonal)
            out["discriminator"] = nets["discriminator"].init_params(generator, device, False)
            state = {"generator_stats": nets["generator"].init_stats(device)}
        return out, state

    def step(network, params, state, batch):
        x = batch.x
        gen = batch.generator()
        r0 = initial_input(init, x, gen)
        n = x.shape[0]
        z_dim = head_width(network, "mu")
        eps = torch.randn((n, z_dim), generator=gen, device=x.device, dtype=x.dtype)
        if beta_schedule == "uniform":
            betas = torch.rand((n,), generator=gen, device=x.device, dtype=x.dtype)
        else:
            betas = torch.full((n,), float(beta), device=x.device, dtype=x.dtype)
        if conditional:
            if batch.y is None:
                raise UserError(f"{name} with conditional=true needs labels")
            labels = one_hot(network, batch.y, 1.0).to(x.device, x.dtype)

        def encoder_loss(model):  # Eq. 5 / Eq. 6
            out = network.apply(model, x)
            mu, logvar = out["mu"], out["logvar"]
            spread = torch.exp(0.5 * logvar) if noise == "std" else torch.exp(logvar)
            z = mu + eps * spread
            r_hat = invert(network, model, target(z, labels if conditional else None), r0)
            rec, kl = squared_error(x, r_hat), gaussian_kl(mu, logvar)
            loss = (rec + betas * kl).mean()
            metrics = {"recon_mse": rec.mean().detach() / x[0].numel(), "kl": kl.mean().detach()}
            if conditional:
                ce = F.cross_entropy(out["cls"], batch.y)
                loss = loss + class_weight * ce
                metrics["class_loss"] = ce.detach()
            extras = {"r_hat": r_hat.detach(), "mu": mu.detach(), "var": logvar.exp().detach()}
            return loss, (metrics, extras)

        g_model, (loss, (metrics, extras)) = grad_and_value(encoder_loss, has_aux=True)(params["model"])
        updates = {"model": g_model}
        metrics = {"loss": loss, **metrics}
        if gan:
            nets = aux(network)
            g_net, d_net = nets["generator"], nets["discriminator"]
            r_hat, model = extras["r_hat"], params["model"]
            fake, stats = g_net.forward_with_stats(params["generator"], r_hat)
            fake = fake.detach()

            def generator_loss(g_params):  # Eq. 7
                refined = g_net.apply(g_params, r_hat)
                adversarial = least_squares(d_net.apply(params["discriminator"], refined), 1.0)
                perceptual = perceptual_distance(extras["mu"], extras["var"], network.apply(model, refined))
                return adversarial + perceptual_weight * perceptual

            def discriminator_loss(d_params):  # Eq. 8
                return (least_squares(d_net.apply(d_params, x), 1.0)
                        + least_squares(d_net.apply(d_params, fake), -1.0))

            updates["generator"], g_loss = grad_and_value(generator_loss)(params["generator"])
            updates["discriminator"], d_loss = grad_and_value(discriminator_loss)(params["discriminator"])
            metrics.update(g_loss=g_loss, d_loss=d_loss)
            state = {**state, "generator_stats": g_net.update_stats(state["generator_stats"], stats)}
        return updates, state, metrics

    # -- reconstruct / sample ---------------------------------------------------------------------
    def reconstruct(network, params, state, x, generator, stages=False):
        model = params["model"]
        with torch.no_grad():
            out = network.apply(model, x)
        onehot = one_hot(network, out["cls"].argmax(1), 1.0).to(x) if conditional else None
        with torch.enable_grad():
            r_hat = invert(network, model, target(out["mu"], onehot), initial_input(init, x, generator)).detach()
        with torch.no_grad():
            x_hat = refine(network, params, state, r_hat).reshape(x.shape)
        if stages:
            return {"latent": out["mu"], "r_hat": r_hat.reshape(x.shape), "x_hat": x_hat}
        return x_hat

    def sample(network, params, state, num, generator, labels=None, latents=None):
        device = model_device(params)
        z = latents.to(device) if latents is not None else standard_normal(num, head_width(network, "mu"), generator, device)
        num = z.shape[0]
        onehot = None
        if conditional:
            classes = head_width(network, "cls")
            if labels is None:
                labels = torch.randint(0, classes, (num,), generator=generator, device=generator.device)
            labels = torch.as_tensor(labels).to(device).long().expand(num)
            if labels.min() < 0 or labels.max() >= classes:
                raise UserError(f"labels must lie in 0..{classes - 1}")
            onehot = one_hot(network, labels, label_scale).to(z)
        elif labels is not None:
            raise UserError(f"rule '{name}' was trained without conditional=true; sample without --label")
        shape = (num, *network.in_shape)
        r0 = initial_input(init, torch.empty(shape, device=generator.device, dtype=z.dtype), generator).to(device)
        with torch.enable_grad():
            r_hat = invert(network, params["model"], target(z, onehot), r0).detach()
        with torch.no_grad():
            return refine(network, params, state, r_hat).reshape(shape).clamp(0, 1)

    rule = Rule(init=init_fn, step=step, task="generate", reconstruct=reconstruct, sample=sample, heads=heads)
    return constrained(rule, clamp(WEIGHT_BOUND)) if clamp_weights else rule


def variational_feature_alignment(
    steps: int = 1, tau: float = 1.0, init: str = "zeros", squash: str = "none", beta_schedule: str = "uniform",
    beta: float = 1.0, noise: str = "std", orthogonal: bool = True, clamp_weights: bool = True,
    conditional: bool = False, label_scale: float = 2.0, class_weight: float = 1.0,
) -> Rule:
    """VFA (section 3.3, Eq. 5): the encoder is its own decoder through the gradient flow."""
    return _variational_fa("vfa", False, steps, tau, init, squash, beta_schedule, beta, noise, orthogonal,
                           clamp_weights, conditional, label_scale, class_weight)


def variational_feature_alignment_gan(
    steps: int = 1, tau: float = 1.0, init: str = "zeros", squash: str = "none", beta_schedule: str = "uniform",
    beta: float = 1.0, noise: str = "std", orthogonal: bool = True, clamp_weights: bool = True,
    conditional: bool = False, label_scale: float = 2.0, class_weight: float = 1.0, perceptual_weight: float = 0.01,
) -> Rule:
    """VFA-GAN (section 3.4, Eq. 6-8): VFA plus a refining generator and an LSGAN discriminator."""
    return _variational_fa("vfa_gan", True, steps, tau, init, squash, beta_schedule, beta, noise, orthogonal,
                           clamp_weights, conditional, label_scale, class_weight, perceptual_weight)


@hookimpl
def register_rules(register):
    register(RuleSpec(
        "vfa", variational_feature_alignment,
        "variational feature alignment: mu/logvar heads, no decoder, samples by the gradient flow (Eq. 5)",
        options=_options(gan=False), ranges=_ranges(gan=False), models=("mlp", "paper_encoder"),
    ))
    register(RuleSpec(
        "vfa_gan", variational_feature_alignment_gan,
        "VFA plus a refining generator (Table 11) and a least-squares discriminator (Table 10), Eq. 6-8",
        options=_options(gan=True), ranges=_ranges(gan=True), models=("mlp", "paper_encoder"),
    ))
