"""Feature alignment: an encoder trained to invert itself through its own input gradient.

Farias & Maziero, "Feature alignment as a generative process", Frontiers in Artificial Intelligence
(2023), section 3.1 and Algorithm 1; the same paper on arXiv (2106.12562) carries the appendix.

    z_x = E(x; theta)                                        (Algorithm 1, line 1)
    r_0 ~ a chosen distribution, shaped like x               (line 2; `init`)
    r_t = r_{t-1} - tau * d/dr 1/2 ||z_x - E(r_t-1)||^2      (Eq. 1-2, T = `steps`, tau = `tau`)
    C = ||x - r_hat||^2                                      (line 12)
    theta <- optimiser step on dC/dtheta                     (second order: through all T steps)

There is no decoder: after training the encoder reconstructs inputs from its latent by running the
same flow (`reconstruct`). Settings and where they come from:

- `steps=1, tau=1.0`: section 4 ("tau = 1 ... at one-shot T = 1").
- `flow_constant=0.5`: the constant c of the flow's distance c ||z_x - E(r)||^2. Algorithm 1 prints
  it without the 1/2 (c = 1); the appendix (Eq. 11, 13) and the stability bound behind the weight
  clamp (w^2 < 2, Eq. 9 and 19) use 1/2. At tau = 1 these are different flows (c = 1 at tau is
  c = 1/2 at 2 tau: one zero-start step gives r = 2 c tau W^T W x). The paper's tau = 1 refers to
  the 1/2 form: with c = 1, tau = 1 and a weight near the clamp sqrt(2) the linear flow's factor
  1 - 2 c tau w^2 = -3 diverges, while with c = 1/2 it is -1, the edge of stability Eq. 9 is built on.
- `init="zeros"`: the authors' code starts the flow at zero; the paper's Algorithm 1 draws r from a
  random distribution, `init=uniform` (on [0, 1), the data range) or `init=normal` do that. A random
  start leaves its null-space part in r_hat, so zeros give the cleaner reconstruction.
- `squash="none"`: the paper compares r_hat with x directly; the authors' code passes r_hat through a
  sigmoid first (`squash=sigmoid`).
- `orthogonal=True`: orthogonal initialisation of every weight (section 4).
- `clamp_weights=True`: weights clamped to +-sqrt(2) after every step (Eq. 9, from the stability
  condition w^2 < 2 of Appendix A), an engine constraint (`fa_rules.core.constrained` + `clamp`);
  biases are not clamped (as in the authors' code).
- `pool_positions="data"`: on convolutional encoders with max pooling (`lenet`, `vgg`), where the
  flow's pools take their maxima (`fa_rules.core.gradient_flow`): at the data's own maxima, so the
  flow's step goes back through each pool by max-unpooling with the forward pass's indices (the
  paper has no pooling; this is scalingDTP's inversion of it), or, with `flow`, at those of the
  flow's current point (torch's max pool as written). Through each convolution the step is its
  transposed convolution.

Supervised training alongside (Eq. 3-4, the toy example of section 3.2) composes with the core
combinator: `weighted_sum([(1.0, feature_alignment(output_weight=w)), (1.0, supervised_rule)])`,
where `output_weight` weights the alignment distance per output unit (Eq. 3: `tensor([alpha, 1])`
for an output `[f, l]`). `benchmarks/toy_inversion.py` does exactly that.
"""

from __future__ import annotations

import math

import torch

from fa_rules.core import Rule, RuleSpec, clamp, constrained, grad_and_value, hookimpl
from fa_rules.core.gradient_flow import (
    INITS,
    POOL_POSITIONS,
    SQUASHES,
    encode,
    forward_with_indices,
    gradient_flow,
    initial_input,
    orthogonal_init,
    reconstruction_loss,
    squash as squash_output,
)
from fa_rules.core.rule import MAX_ITERATIONS, POSITIVE, Range

WEIGHT_BOUND = math.sqrt(2.0)  # Eq. 9
# the declared ranges of the gradient flow's settings, shared by every rule that runs the flow; each
# flow step is a forward and backward pass kept for the second-order gradient
FLOW_RANGES = {"steps": Range(1, MAX_ITERATIONS), "tau": POSITIVE, "init": INITS, "squash": SQUASHES}
# convolutional encoders: batch norm with batch statistics is no per-example map to invert, so the
# rules that run the flow build `vgg` without it unless asked
CONV_MODEL_DEFAULTS = {"batch_norm": False}


def feature_alignment(
    steps: int = 1,
    tau: float = 1.0,
    init: str = "zeros",
    squash: str = "none",
    orthogonal: bool = True,
    clamp_weights: bool = True,
    output_weight: torch.Tensor | None = None,
    flow_constant: float = 0.5,
    pool_positions: str = "data",
) -> Rule:
    """Algorithm 1. `output_weight` (Python use only) weights the alignment distance per output.
    Settings are checked against `FLOW_RANGES` by the registered spec (`RuleSpec.check_options`)."""

    def init_fn(network, params, generator):
        model = orthogonal_init(params["model"], generator) if orthogonal else params["model"]
        return {**params, "model": model}, {}

    def latent(network, model, x):
        """(z_x, the data's max-pool indices where the flow's pools take them, else None)."""
        z, indices = forward_with_indices(network, model, x)
        return z, (indices if pool_positions == "data" else None)

    def invert(network, model, z, r0, indices):
        """r_hat for the latent z: the flow of Eq. 2 through the whole encoder, then the squash."""
        weight = None if output_weight is None else output_weight.to(r0.device)
        r = gradient_flow(lambda r: encode(network, model, r, indices), z, r0, steps, tau, weight, flow_constant)
        return squash_output(squash, r)

    def step(network, params, state, batch):
        r0 = initial_input(init, batch.x, batch.generator())

        def loss_fn(model):
            z, indices = latent(network, model, batch.x)
            return reconstruction_loss(batch.x, invert(network, model, z, r0, indices))

        grads, loss = grad_and_value(loss_fn)(params["model"])
        # a conv weight's second-order gradient comes with permuted strides; torch's fused optimiser
        # kernels read an update as laid out like its parameter
        return {"model": {k: g.contiguous() for k, g in grads.items()}}, state, {"loss": loss}

    def reconstruct(network, params, state, x, generator):
        model = params["model"]
        with torch.no_grad():
            z, indices = latent(network, model, x)
        return invert(network, model, z, initial_input(init, x, generator), indices).detach().reshape(x.shape)

    rule = Rule(init=init_fn, step=step, task="reconstruct", reconstruct=reconstruct)
    return constrained(rule, clamp(WEIGHT_BOUND)) if clamp_weights else rule


@hookimpl
def register_rules(register):
    register(RuleSpec(
        "feature_alignment", feature_alignment,
        "encoder that reconstructs its input by a gradient flow on its own latent (Algorithm 1)",
        options={"steps": 1, "tau": 1.0, "init": "zeros", "squash": "none", "orthogonal": True,
                 "clamp_weights": True, "flow_constant": 0.5, "pool_positions": "data"},
        ranges={**FLOW_RANGES, "flow_constant": POSITIVE, "pool_positions": POOL_POSITIONS},
        models=("mlp", "lenet", "vgg", "paper_encoder"),
        model_defaults=CONV_MODEL_DEFAULTS,
    ))
