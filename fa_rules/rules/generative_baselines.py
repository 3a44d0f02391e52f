"""Generative baselines trained by backpropagation: a VAE and a least-squares GAN.

The feature alignment paper (Farias & Maziero, Frontiers in Artificial Intelligence 2023, section 5,
Tables 2-6) compares VFA and VFA-GAN with "traditional variational autoencoders and generative
adversarial networks" on the same encoder sizes. Both are here, over the same network view, data
and optimiser as every other rule:

- `vae` (Kingma & Welling 2014). The model is the encoder with `mu` and `logvar` heads; the rule
  owns a `decoder` group: the paper's latent-to-image generator (appendix Table 12,
  `fa_rules.models.gan_generator`) for paper encoders, an MLP mirroring the encoder's hidden
  widths for `mlp` encoders. Loss per example, averaged over the batch (minus the ELBO):

      -log p(x | D(mu + eps * sigma)) + beta * KL(N(mu, sigma^2) || N(0, I))

  `likelihood="bernoulli"` (the traditional image VAE: binary cross-entropy summed over pixels) or
  `"gaussian"` (||x - D(z)||^2, the squared error of VFA's Eq. 5; on 8x8 digits it collapses the
  posterior at beta = 1). Reconstruction decodes the mean, sampling decodes z ~ N(0, I).
- `gan` (Goodfellow et al. 2014; least squares as Mao et al. 2017 and the paper's Eq. 7-8 without
  the perceptual term). The model is the discriminator: the encoder body with one linear head `d`
  (`--model paper_discriminator` is exactly Table 10, batch norm included; `paper_encoder` is the
  same without batch norm). The rule owns a `generator` group (Table 12, or a mirrored MLP):

      L_D = mean (1 - D(x))^2 + mean (-1 - D(G(z)))^2        (Eq. 8)
      L_G = mean (1 - D(G(z)))^2                             (Eq. 7 with lambda = 0)

  Both updates come from the same step (simultaneous gradients; G(z) is a constant in L_D).
  Reconstruction searches the latent space as the paper's section 4 does for GANs,
  argmin_z ||x - G(z)||^2, by `recon_steps` Adam steps from z = 0.

Shared mechanics for every generative rule of this family (also used by `vfa` / `vfa_gan`):
auxiliary networks built on the meta device from the encoder's shapes (architecture only, no
global RNG), their parameters drawn from the rule's generator, and the Gaussian KL. The MLP
generators (for `mlp` encoders) keep the paper generators' batch norm; they train on batch
statistics and sample with running averages kept in the rule's state (`generator_stats`), so one
sample alone is the sample it would be in a batch.

Extensions of the rule contract that the `sample` and `reconstruct` commands use when present:
`sample(..., latents=z)` decodes given latents (N, Z) instead of drawing them, and
`reconstruct(..., stages=True)` returns a dict: `latent` (N, Z), `x_hat` (the reconstruction) and,
for the feature alignment rules, `r_hat` (the flow's output before any generator).
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch

from fa_rules.core import Rule, RuleSpec, UserError, grad, grad_and_value, hookimpl
from fa_rules import models as zoo
from fa_rules.core.gradient_flow import orthogonal_init
from fa_rules.core.rule import ITERATIONS, NON_NEGATIVE, POSITIVE
from fa_rules.core.network import ACTIVATIONS, Network, make_activation

PAPER_FAMILIES = ("paper_encoder", "paper_discriminator")
PAPER_SIDES = (28, 32, 64)


# -- auxiliary networks: architecture from shapes, parameters from the rule's generator -------------
def _activation_name(module: torch.nn.Module) -> str:
    return next(n for n in ACTIVATIONS if type(make_activation(n)) is type(module))


def hidden_widths(network: Network) -> list[int]:
    """Output widths of the dense hidden blocks of an MLP body that ends in heads."""
    return [b.layer.out_features for b in network.blocks if isinstance(b.layer, torch.nn.Linear)]


def head_width(network: Network, name: str) -> int:
    return network.heads[name].layer.out_features


def uses_paper_networks(network: Network) -> bool:
    """Paper encoders get the paper's tables; `mlp` encoders get MLPs of the same widths."""
    if network.family in PAPER_FAMILIES:
        return True
    if network.family == "mlp":
        return False
    raise UserError(f"model family '{network.family}' has no generative networks here (use mlp or a paper network)")


def batch_norm_mlp(in_shape, out_shape, widths, activation: str, out_activation: str) -> Network:
    """Linear blocks with batch norm after each hidden activation: the MLP analogue of the paper's
    generators, which put batch norm after every hidden layer (Tables 11-12)."""
    from torch import nn

    from fa_rules.core.network import Block, flat_size

    blocks, width = [], flat_size(in_shape)
    for i, w in enumerate(widths):
        blocks.append(Block(nn.Linear(width, w), make_activation(activation),
                            nn.BatchNorm1d(w, track_running_stats=False), in_shape=(width,) if i == 0 else None))
        width = w
    blocks.append(Block(nn.Linear(width, flat_size(out_shape)), make_activation(out_activation),
                        in_shape=None if widths else (width,)))
    return Network(blocks, {}, family="mlp", in_shape=in_shape, out_shape=out_shape)


class AuxNet:
    """A rule-owned network: the architecture (on the meta device); parameters, and running
    statistics where it keeps them, live in the rule's params and state.

    `apply(params, x)` is the training forward (batch norm on batch statistics).
    `apply(params, x, stats)` evaluates: networks with `running_stats` (the MLP generators, whose
    batch norm over single vectors cannot see one sample alone) normalise with the running averages
    `stats`; the paper's convolutional networks always use batch statistics (over the batch and the
    pixels, so one sample works), as `fa_rules.models` defines them, and ignore `stats`.
    """

    def __init__(self, net: Network, running_stats: bool = False):
        self.net = net
        self.norms = [i for i, b in enumerate(net.blocks) if isinstance(b.post, torch.nn.BatchNorm1d)]
        self.running_stats = running_stats and bool(self.norms)

    def init_params(self, generator: torch.Generator, device, orthogonal: bool = False) -> dict:
        return init_params(self.net, generator, device, orthogonal)

    def init_stats(self, device) -> dict:
        if not self.running_stats:
            return {}
        out = {}
        for i in self.norms:
            n = self.net.blocks[i].post.num_features
            out[f"blocks.{i}.post.mean"] = torch.zeros(n, device=device)
            out[f"blocks.{i}.post.var"] = torch.ones(n, device=device)
        return out

    def _walk(self, params, x, stats=None, collect=None):
        h = x
        for i, block in enumerate(self.net.blocks):
            h = block.activation(self.net.block_apply(i, params, h, pre_activation=True))
            if i in self.norms:
                weight, bias = params[f"blocks.{i}.post.weight"], params[f"blocks.{i}.post.bias"]
                if stats is None:
                    if collect is not None:
                        collect[f"blocks.{i}.post.mean"] = h.mean(0).detach()
                        collect[f"blocks.{i}.post.var"] = h.var(0).detach()  # unbiased, as torch's running_var
                    h = torch.nn.functional.batch_norm(h, None, None, weight, bias, True, 0.0, block.post.eps)
                else:
                    h = torch.nn.functional.batch_norm(h, stats[f"blocks.{i}.post.mean"], stats[f"blocks.{i}.post.var"],
                                                       weight, bias, False, 0.0, block.post.eps)
        return h.reshape(x.shape[0], *self.net.out_shape)

    def apply(self, params: dict, x: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
        if not self.running_stats:
            return self.net.apply(params, x)
        return self._walk(params, x, stats)

    def forward_with_stats(self, params: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training forward (outside any transform) and the batch statistics it normalised with."""
        if not self.running_stats:
            return self.net.apply(params, x), {}
        collect: dict = {}
        return self._walk(params, x, None, collect), collect

    @staticmethod
    def update_stats(stats: dict, batch: dict, momentum: float = 0.1) -> dict:
        """New running averages (PyTorch's batch norm update, as new tensors: steps stay pure)."""
        return {k: (1 - momentum) * v + momentum * batch[k] for k, v in stats.items()}


def build_aux(kind: str, encoder: Network, latent: int | None = None) -> AuxNet:
    """The architecture (on the meta device: no memory, no RNG) of an auxiliary network.

    kind: `decoder` (latent -> image, the VAE's), `generator` (latent -> image, the GAN's; both
    Table 12), `refiner` (image -> image, Table 11) or `discriminator` (image -> 1, Table 10), at
    the encoder's `width_multiplier` (`fa_rules.models`). For
    `mlp` encoders: MLPs with the encoder's hidden widths and activation; the two generators keep
    the tables' batch norm after every hidden layer (without it a refiner fed the low-variance r_hat
    collapses to one output), with running statistics for evaluation; the decoder and the
    discriminator have none.
    """
    image = tuple(encoder.in_shape)
    paper = uses_paper_networks(encoder)
    with torch.device("meta"):
        if paper:  # the paper's tables at the encoder's width multiplier
            m = encoder.options.get("width_multiplier", 1.0)
            if kind in ("decoder", "generator"):
                return AuxNet(zoo.gan_generator((latent,), image, width_multiplier=m))
            if kind == "refiner":
                return AuxNet(zoo.fa_generator(image, width_multiplier=m))
            if kind == "discriminator":
                return AuxNet(zoo.paper_discriminator(image, (1,), width_multiplier=m))
        else:
            widths = hidden_widths(encoder)
            act = _activation_name(encoder.blocks[0].activation) if encoder.num_blocks else "leaky_relu"
            depth, width = len(widths), (widths[0] if widths else 1)
            if kind == "decoder":
                return AuxNet(zoo.mlp((latent,), image, depth=depth, width=width, activation=act, out_activation="sigmoid"))
            if kind == "generator":
                return AuxNet(batch_norm_mlp((latent,), image, widths[::-1], act, "sigmoid"), running_stats=True)
            if kind == "refiner":
                return AuxNet(batch_norm_mlp(image, image, widths[::-1], act, "sigmoid"), running_stats=True)
            if kind == "discriminator":
                return AuxNet(zoo.mlp(image, (1,), depth=depth, width=width, activation=act))
    raise ValueError(f"unknown auxiliary network kind '{kind}'")


def init_params(net: Network, generator: torch.Generator, device, orthogonal: bool = False) -> dict:
    """Parameters for `net` from `generator` only: PyTorch's default layer init (uniform within
    +-1/sqrt(fan_in)), batch norm at (1, 0); `orthogonal` re-draws every weight matrix orthogonally."""
    params = {}
    for mod_name, module in net.named_modules():
        local = dict(module.named_parameters(recurse=False))
        if not local:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params[prefix + "weight"] = torch.ones(local["weight"].shape)
            params[prefix + "bias"] = torch.zeros(local["bias"].shape)
            continue
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(local["weight"].shape, device="meta"))
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        for name, p in local.items():
            params[prefix + name] = (torch.rand(p.shape, generator=generator) * 2 - 1) * bound
    if orthogonal:
        params = orthogonal_init(params, generator)
    return {k: v.to(device) for k, v in params.items()}


def model_device(params) -> torch.device:
    return next(iter(params["model"].values())).device


class AuxNetworks:
    """Per-encoder cache of a rule's auxiliary networks (rebuilt from shapes after a reload)."""

    def __init__(self, build: Callable[[Network], dict[str, AuxNet]]):
        self._build = build
        self._cache: "weakref.WeakKeyDictionary[Network, dict[str, AuxNet]]" = weakref.WeakKeyDictionary()

    def __call__(self, network: Network) -> dict[str, AuxNet]:
        if network not in self._cache:
            self._cache[network] = self._build(network)
        return self._cache[network]


# -- losses ---------------------------------------------------------------------------------------
def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def squared_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x - y||^2 per example (summed over every element of one example)."""
    return (x - y.reshape(x.shape)).pow(2).flatten(1).sum(dim=1)


def least_squares(d: torch.Tensor, target: float) -> torch.Tensor:
    """mean (target - D)^2 over the batch: the least-squares GAN terms of Eq. 7-8."""
    return (target - d).pow(2).mean()


def standard_normal(num: int, dim: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(num, dim, generator=generator, device=generator.device).to(device)


def no_labels(rule_name: str, labels) -> None:
    if labels is not None:
        raise UserError(f"rule '{rule_name}' is not class-conditional; sample without --label")


# -- vae --------------------------------------------------------------------------------------------
LIKELIHOODS = ("bernoulli", "gaussian")


def vae(beta: float = 1.0, likelihood: str = "bernoulli", orthogonal: bool = False) -> Rule:
    """Variational autoencoder on the model's `mu`/`logvar` heads, decoder owned by the rule."""

    def neg_log_likelihood(x, x_hat):
        if likelihood == "gaussian":
            return squared_error(x, x_hat)
        x_hat = x_hat.reshape(x.shape).clamp(1e-6, 1 - 1e-6)  # decoders end in a sigmoid
        return -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).flatten(1).sum(dim=1)

    def build(network):
        if not {"mu", "logvar"} <= set(network.heads):
            raise UserError("vae needs an encoder with mu and logvar heads")
        return {"decoder": build_aux("decoder", network, head_width(network, "mu"))}

    aux = AuxNetworks(build)

    def init(network, params, generator):
        decoder = aux(network)["decoder"]
        device = model_device(params)
        model = orthogonal_init(params["model"], generator) if orthogonal else params["model"]
        return {**params, "model": model, "decoder": decoder.init_params(generator, device, orthogonal)}, {}

    def step(network, params, state, batch):
        decoder = aux(network)["decoder"]
        x = batch.x
        dtype = next(iter(params["model"].values())).dtype
        # drawn before the differentiated function: a generator inside it breaks torch.compile's
        # graph there, and the whole gradient then runs eager (the forward pass draws nothing, so
        # the draws are the same)
        eps = torch.randn((x.shape[0], head_width(network, "mu")), generator=batch.generator(),
                          device=x.device, dtype=dtype)

        def loss_fn(model, dec):
            out = network.apply(model, x)
            mu, logvar = out["mu"], out["logvar"]
            x_hat = decoder.apply(dec, mu + eps * torch.exp(0.5 * logvar))
            rec, kl = neg_log_likelihood(x, x_hat), gaussian_kl(mu, logvar)
            loss = (rec + beta * kl).mean()
            mse = (x - x_hat.reshape(x.shape)).pow(2).mean()
            return loss, {"recon_mse": mse.detach(), "kl": kl.mean().detach()}

        (g_model, g_dec), (loss, metrics) = grad_and_value(loss_fn, argnums=(0, 1), has_aux=True)(
            params["model"], params["decoder"]
        )
        return {"model": g_model, "decoder": g_dec}, state, {"loss": loss, **metrics}

    def decode(network, params, z):
        return aux(network)["decoder"].apply(params["decoder"], z)

    def reconstruct(network, params, state, x, generator, stages=False):
        with torch.no_grad():
            mu = network.apply(params["model"], x)["mu"]
            x_hat = decode(network, params, mu).reshape(x.shape)
        return {"latent": mu, "x_hat": x_hat} if stages else x_hat

    def sample(network, params, state, num, generator, labels=None, latents=None):
        no_labels("vae", labels)
        device = model_device(params)
        z = latents.to(device) if latents is not None else standard_normal(num, head_width(network, "mu"), generator, device)
        with torch.no_grad():
            return decode(network, params, z).reshape(z.shape[0], *network.in_shape).clamp(0, 1)

    return Rule(init=init, step=step, task="generate", reconstruct=reconstruct, sample=sample,
                heads=lambda latent, num_classes: {"mu": latent, "logvar": latent})


# -- gan --------------------------------------------------------------------------------------------
def gan(orthogonal: bool = False, recon_steps: int = 50, recon_lr: float = 0.1) -> Rule:
    """Least-squares GAN: the model is the discriminator (head `d`), the rule owns the generator."""

    def latent_of(network):
        if network.out_shape is None or len(network.out_shape) != 1:
            raise UserError("gan needs a flat latent size (--latent-dim)")
        return network.out_shape[0]

    def build(network):
        if set(network.heads) != {"d"}:
            raise UserError("gan needs a discriminator with a single head 'd'")
        return {"generator": build_aux("generator", network, latent_of(network))}

    aux = AuxNetworks(build)

    def init(network, params, generator):
        g = aux(network)["generator"]
        device = model_device(params)
        model = orthogonal_init(params["model"], generator) if orthogonal else params["model"]
        state = {"generator_stats": g.init_stats(device)}
        return {**params, "model": model, "generator": g.init_params(generator, device, orthogonal)}, state

    def discriminate(network, model, images):
        return network.apply(model, images)["d"]

    def step(network, params, state, batch):
        g_net = aux(network)["generator"]
        x = batch.x
        z = standard_normal(x.shape[0], latent_of(network), batch.generator(), x.device)
        fake, stats = g_net.forward_with_stats(params["generator"], z)
        fake = fake.detach()

        def d_loss_fn(model):  # Eq. 8
            return least_squares(discriminate(network, model, x), 1.0) + least_squares(discriminate(network, model, fake), -1.0)

        def g_loss_fn(gen_params):  # Eq. 7, lambda = 0
            return least_squares(discriminate(network, params["model"], g_net.apply(gen_params, z)), 1.0)

        g_model, d_loss = grad_and_value(d_loss_fn)(params["model"])
        g_gen, g_loss = grad_and_value(g_loss_fn)(params["generator"])
        new_state = {**state, "generator_stats": g_net.update_stats(state["generator_stats"], stats)}
        # `loss` is the discriminator's (it falls while D learns); both are logged
        return {"model": g_model, "generator": g_gen}, new_state, {"loss": d_loss, "d_loss": d_loss, "g_loss": g_loss}

    def generate(network, g_params, state, z):  # evaluation: running statistics where kept
        return aux(network)["generator"].apply(g_params, z, state["generator_stats"])

    def reconstruct(network, params, state, x, generator, stages=False):
        """argmin_z ||x - G(z)||^2 (paper, section 4) by Adam from z = 0."""
        g_params = {k: v.detach() for k, v in params["generator"].items()}
        z = torch.zeros(x.shape[0], latent_of(network), device=x.device)
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        search = grad(lambda z_: squared_error(x, generate(network, g_params, state, z_)).sum())
        for t in range(1, recon_steps + 1):
            g = search(z).detach()
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            z = z - recon_lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        with torch.no_grad():
            x_hat = generate(network, g_params, state, z).reshape(x.shape)
        return {"latent": z, "x_hat": x_hat} if stages else x_hat

    def sample(network, params, state, num, generator, labels=None, latents=None):
        no_labels("gan", labels)
        device = model_device(params)
        z = latents.to(device) if latents is not None else standard_normal(num, latent_of(network), generator, device)
        with torch.no_grad():
            return generate(network, params["generator"], state, z).reshape(z.shape[0], *network.in_shape).clamp(0, 1)

    return Rule(init=init, step=step, task="generate", reconstruct=reconstruct, sample=sample,
                heads=lambda latent, num_classes: {"d": 1})


@hookimpl
def register_rules(register):
    register(RuleSpec("vae", vae, "backprop variational autoencoder, Table 12 decoder (the paper's baseline)",
                      options={"beta": 1.0, "likelihood": "bernoulli", "orthogonal": False},
                      # a negative beta rewards the divergence it should penalise
                      ranges={"beta": NON_NEGATIVE, "likelihood": LIKELIHOODS},
                      models=("mlp", "paper_encoder")))
    register(RuleSpec("gan", gan, "backprop least-squares GAN: Table 12 generator, the model is the discriminator",
                      options={"orthogonal": False, "recon_steps": 50, "recon_lr": 0.1},
                      ranges={"recon_steps": ITERATIONS, "recon_lr": POSITIVE},  # the latent search's Adam
                      models=("mlp", "paper_discriminator", "paper_encoder")))
