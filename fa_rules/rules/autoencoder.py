"""Backprop autoencoder: the baseline the feature alignment rules are compared with.

Encoder = the model (its output is the latent), decoder = a parameter group the rule owns
(`"decoder"`), both trained by backpropagation on C = ||x - D(E(x))||^2 (mean per element, the
engine's `test_recon_mse`). The decoder mirrors the encoder:

- `mlp` encoders: an MLP from the latent through the same hidden widths and activation back to the
  input, ending in a sigmoid (inputs are in [0, 1]);
- `paper_encoder`: the feature alignment paper's latent-to-image generator (appendix Table 12,
  `fa_rules.models.gan_generator`), as used for its GAN baseline.

The decoder is built from the encoder's shape when the rule is initialised; its initial parameters
come from the rule's generator only. Feature alignment needs no decoder (about half the parameters,
the paper's Table 3); `summary.json`'s `params_by_group` shows the difference.
"""

from __future__ import annotations

import weakref

import torch

from fa_rules.core import Rule, RuleSpec, UserError, grad_and_value, hookimpl
from fa_rules import models as zoo
from fa_rules.core.gradient_flow import reconstruction_loss
from fa_rules.core.network import ACTIVATIONS, Network, make_activation

DECODER = "decoder"


def _activation_name(module: torch.nn.Module) -> str:
    return next(n for n in ACTIVATIONS if type(make_activation(n)) is type(module))


def build_decoder(encoder: Network) -> Network:
    """The decoder mirroring `encoder` (module docstring); parameters from the global RNG."""
    if encoder.out_shape is None or len(encoder.out_shape) != 1 or len(encoder.heads):
        raise UserError("the autoencoder needs an encoder with one flat latent output")
    (latent,) = encoder.out_shape
    if encoder.family == "mlp":
        hidden = [b.layer.out_features for b in encoder.blocks[:-1]]
        activation = _activation_name(encoder.blocks[0].activation) if hidden else "identity"
        return zoo.mlp((latent,), encoder.in_shape, depth=len(hidden), width=hidden[0] if hidden else 1,
                       activation=activation, out_activation="sigmoid")
    if encoder.family == "paper_encoder":  # Table 12 at the encoder's width multiplier
        return zoo.gan_generator((latent,), encoder.in_shape,
                                 width_multiplier=encoder.options.get("width_multiplier", 1.0))
    raise UserError(f"the autoencoder has no decoder for model family '{encoder.family}' (use mlp or paper_encoder)")


def autoencoder() -> Rule:
    decoders: "weakref.WeakKeyDictionary[Network, Network]" = weakref.WeakKeyDictionary()

    def decoder_of(network: Network) -> Network:
        # the architecture only (parameters live in params["decoder"]); built once per encoder
        if network not in decoders:
            decoders[network] = build_decoder(network)
        return decoders[network]

    def init(network, params, generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = build_decoder(network)
        decoders[network] = decoder
        device = next(iter(params["model"].values())).device
        return {**params, DECODER: {k: v.to(device) for k, v in decoder.init_params().items()}}, {}

    def step(network, params, state, batch):
        decoder = decoder_of(network)

        def loss_fn(model, dec):
            return reconstruction_loss(batch.x, decoder.apply(dec, network.apply(model, batch.x)))

        (g_model, g_decoder), loss = grad_and_value(loss_fn, argnums=(0, 1))(params["model"], params[DECODER])
        return {"model": g_model, DECODER: g_decoder}, state, {"loss": loss}

    def reconstruct(network, params, state, x, generator):
        with torch.no_grad():
            return decoder_of(network).apply(params[DECODER], network.apply(params["model"], x)).reshape(x.shape)

    return Rule(init=init, step=step, task="reconstruct", reconstruct=reconstruct)


@hookimpl
def register_rules(register):
    register(RuleSpec("ae", autoencoder, "backprop autoencoder with a mirrored decoder (the baseline)",
                      models=("mlp", "paper_encoder"), aliases=("autoencoder",)))
