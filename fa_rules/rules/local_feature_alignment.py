"""Local feature alignment: every block learns to invert itself from its own input and output only.

Farias & Maziero, "Feature alignment as a generative process", Frontiers in Artificial Intelligence
(2023), section 3.5, Algorithm 2 (training) and Algorithm 3 (reconstruction), results in section 5.5.

Training, Algorithm 2, for each block l = 0 .. L-1 in order:

    z_l = f_l(x_l)                                        (line 2)
    r_0 ~ a chosen distribution, shaped like x_l          (line 3; `init`)
    r_t = r_{t-1} - tau * d/dr 1/2 ||z_l - f_l(r)||^2     (lines 5-10, Eq. 2; T = `steps`)
    C_l = ||x_l - r_hat||^2                               (line 12)
    theta_l <- dC_l/dtheta_l                              (line 13; nothing else reaches theta_l)
    x_{l+1} = block output, detached                      (line 14)

Each block is differentiated on its own with `fa_rules.core.grad_and_value` and its graph is freed
before the next block starts, so the bytes saved for backward peak at one block's second-order
graph whatever the depth (backprop keeps every block's activations). Every parametrised block is
trained, the latent block included.

What `f_l` is (`flow`):

- `flow="layer"` (default): the flow runs through the block's parametrised map only (Linear / Conv,
  pre-activation), and the invertible activation is undone exactly by its inverse. This is how the
  authors' code splits a network (activations are separate layers) and what Algorithm 3 needs ("apply
  the inverse of the non-linear function after each layer that makes use of the function"); with
  T = 1, tau = 1 and a zero start the block learns r_hat = W^T W x_l -> x_l, the orthogonality of
  the paper's Appendix A. The bias cancels in z_l - f_l(r), so it receives a zero update. Needs an
  invertible activation: asinh (the default here, as section 3.5 argues), tanh, leaky_relu, sigmoid.
- `flow="block"`: the flow runs through the whole block (map, activation, pooling), the literal
  reading of Algorithm 2 with `E(.; theta_l)` = the block; reconstruction then applies no inverse.

Convolutional encoders (`paper_encoder`, `lenet`, `vgg`; under this rule their output layer is the
`--latent-dim` latent): a conv block's flow step is the transposed convolution of its error
(`fa_rules.core.gradient_flow`). The paper's encoders have no pooling (stride 2, section 4), so it is
silent on a block `conv -> activation -> max pool`; two settings, one per flow, say what happens:

- `unpool="nearest"` (`flow=layer`): the pool lies outside f_l (the block trains its convolution
  alone, on its own input and pre-activation), so only Algorithm 3 meets it, carrying block l's
  reconstructed output back to the pre-pool map before the activation's inverse. `nearest` copies
  each value over its window: it needs nothing from a forward pass, so it decodes any latent (the
  algorithm starts from a sampled z_L), and it reconstructs better (on digits, one trained lenet
  level: 0.087 against 0.255 mean squared error). `indices` max-unpools with the indices of the
  data's forward pass (zeros elsewhere), as Ernoult et al. 2022 (scalingDTP) invert max pooling.
- `pool_positions="data"` (`flow=block`, and `feature_alignment`): the flow runs through the pool,
  taken at the maxima of the data's forward pass (the indices of x_{l+1} = pool(a_l)); the flow's
  step goes back through it by max-unpooling with those indices. `flow`: torch's max pool at the
  flow's current point (from zeros every window ties and the step lands on its first position).

Batch norm is refused with `flow=layer` (its batch statistics couple the examples; `vgg` is built
without it under this rule unless `batch_norm=true` is asked for, which then needs `flow=block`).

Reconstruction, Algorithm 3: encode x to its latent, then for l = L-1 .. 0 run the same flow for the
block (after the activation's inverse, in `layer` mode) from a fresh start; r_hat becomes the target
of the block below. Other settings as in `feature_alignment`: `steps=1, tau=1.0` (section 4),
`init="zeros"` (authors' code; `uniform`/`normal` as the paper's Algorithm 2), `squash` applied to
the input-space reconstruction (block 0), `orthogonal=True`, `clamp_weights=True` (Eq. 9).
"""

from __future__ import annotations

import math

import torch

from fa_rules.core import Rule, RuleSpec, UserError, clamp, constrained, grad_and_value, hookimpl
from fa_rules.core.gradient_flow import (
    POOL_POSITIONS,
    UNPOOLS,
    block_at,
    block_with_indices,
    gradient_flow,
    initial_input,
    max_pool_post,
    orthogonal_init,
    reconstruction_loss,
    squash as squash_output,
    unpool as max_unpool,
    upsample_nearest,
)
from fa_rules.core.network import Network, inverse_activation
from fa_rules.rules.feature_alignment import CONV_MODEL_DEFAULTS, FLOW_RANGES

FLOWS = ("layer", "block")
WEIGHT_BOUND = math.sqrt(2.0)  # Eq. 9


def _check_network(network: Network, flow: str) -> None:
    if len(network.heads):
        raise UserError("local_fa trains a chain of blocks; this network has heads")
    network.require_layered("invertible blocks (layer -> activation) to send targets down through", "local_fa")
    if flow != "layer":
        return
    probe = torch.zeros(1)
    for i, block in enumerate(network.blocks):
        if not isinstance(block.post, (torch.nn.Identity, torch.nn.MaxPool2d)):
            hint = " (vgg: batch_norm=false, the default under this rule)" if network.family == "vgg" else ""
            raise UserError(f"local_fa with flow=layer cannot invert block {i}'s {type(block.post).__name__}; "
                            f"use flow=block or a network without it{hint}")
        try:
            inverse_activation(block.activation, probe)
        except ValueError:
            raise UserError(
                f"local_fa with flow=layer needs invertible activations (asinh, tanh, leaky_relu, sigmoid); "
                f"block {i} uses {type(block.activation).__name__}"
            ) from None


def local_feature_alignment(
    steps: int = 1,
    tau: float = 1.0,
    init: str = "zeros",
    squash: str = "none",
    orthogonal: bool = True,
    clamp_weights: bool = True,
    flow: str = "layer",
    pool_positions: str = "data",
    unpool: str = "nearest",
) -> Rule:
    """Algorithms 2 (step) and 3 (reconstruct)."""
    pre_activation = flow == "layer"
    at_data = pool_positions == "data"
    if pre_activation and not at_data:  # a setting that would change nothing is a mistake to say
        raise UserError("local_fa: pool_positions applies to flow=block (a flow through the pool); with "
                        "flow=layer the pool is outside the flow and unpool=nearest|indices inverts it")
    if not pre_activation and unpool != "nearest":
        raise UserError("local_fa: unpool applies to flow=layer; with flow=block the flow runs through the "
                        "pool, which pool_positions=data|flow sets")

    def f(network: Network, i: int, params, r, indices):
        """f_l: block i's map (pre-activation in `layer` mode, the whole block otherwise, its max pool
        taken at `indices`, the data's maxima, or at r's own when None)."""
        if pre_activation:
            return network.block_apply(i, params, r, pre_activation=True)
        return block_at(network, i, params, r, indices)

    def init_fn(network, params, generator):
        _check_network(network, flow)
        model = orthogonal_init(params["model"], generator) if orthogonal else params["model"]
        return {**params, "model": model}, {}

    def block_step(network: Network, i: int, model, x: torch.Tensor, r0: torch.Tensor, indices):
        """Algorithm 2, lines 2-13, for block i: (gradients of its parameters, C_i)."""

        def local_loss(block_params):
            z = f(network, i, block_params, x, indices)
            r_hat = gradient_flow(lambda r: f(network, i, block_params, r, indices), z, r0, steps, tau)
            if i == 0:
                r_hat = squash_output(squash, r_hat)
            return reconstruction_loss(x, r_hat)

        return grad_and_value(local_loss)({k: model[k] for k in network.block_keys[i]})

    def step(network, params, state, batch):
        model = params["model"]
        generator = batch.generator()
        updates, metrics, total = {}, {}, 0.0
        x = batch.x
        for i in range(network.num_blocks):
            with torch.no_grad():  # line 14: x_{l+1} carries no graph into the next block
                out, indices = block_with_indices(network, i, model, x)
            if network.block_keys[i]:
                grads, loss = block_step(network, i, model, x, initial_input(init, x, generator),
                                         indices if at_data else None)
                # a conv weight's second-order gradient comes with permuted strides; torch's fused
                # optimiser kernels read an update as laid out like its parameter
                updates.update({k: g.contiguous() for k, g in grads.items()})
                metrics[f"block{i}_loss"] = loss
                total = total + loss
            x = out
        metrics["loss"] = total
        return {"model": updates}, state, metrics

    def before_pool(network: Network, i: int, model, h, x_i, indices):
        """Block i's pre-pool activation map reconstructed from its pooled output h (`layer` mode)."""
        with torch.no_grad():
            like = network.blocks[i].activation(network.block_apply(i, model, x_i, pre_activation=True))
        return max_unpool(h, indices, like) if unpool == "indices" else upsample_nearest(h, like)

    def reconstruct(network, params, state, x, generator):
        model = params["model"]
        inputs, pool_indices = [], []
        h = x
        with torch.no_grad():
            for i in range(network.num_blocks):
                inputs.append(h)
                h, indices = block_with_indices(network, i, model, h)
                pool_indices.append(indices)
        for i in reversed(range(network.num_blocks)):  # Algorithm 3
            indices = pool_indices[i] if at_data else None
            if pre_activation:
                if max_pool_post(network, i) is not None:
                    h = before_pool(network, i, model, h, inputs[i], pool_indices[i])
                target = inverse_activation(network.blocks[i].activation, h)
            else:
                target = h
            r0 = initial_input(init, inputs[i], generator)
            h = gradient_flow(lambda r: f(network, i, model, r, indices), target, r0, steps, tau).detach()
        return squash_output(squash, h).reshape(x.shape)

    rule = Rule(init=init_fn, step=step, task="reconstruct", reconstruct=reconstruct)
    return constrained(rule, clamp(WEIGHT_BOUND)) if clamp_weights else rule


@hookimpl
def register_rules(register):
    register(RuleSpec(
        "local_fa", local_feature_alignment,
        "layer-local feature alignment: each block learns to invert itself (Algorithms 2-3)",
        options={"steps": 1, "tau": 1.0, "init": "zeros", "squash": "none", "orthogonal": True,
                 "clamp_weights": True, "flow": "layer", "pool_positions": "data", "unpool": "nearest"},
        ranges={**FLOW_RANGES, "flow": FLOWS, "pool_positions": POOL_POSITIONS, "unpool": UNPOOLS},
        models=("mlp", "paper_encoder", "lenet", "vgg"),
        aliases=("local_feature_alignment",),
        model_defaults={"activation": "asinh", **CONV_MODEL_DEFAULTS},
    ))
