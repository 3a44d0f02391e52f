"""The feedback-alignment family, learned feedback: feedback tensors trained by rules of their own.

Notation as in `fa_rules.rules.feedback_alignment` (`a_l = W_l h_{l-1} + b_l`, `h_l = f(a_l)`, `e`
the output error, `y*` the one-hot target, `B_l` shaped like `W_l`). The forward weights are
trained exactly as by FA or DFA; what differs is that the feedback is a parameter group `feedback`
with updates of its own, which the engine optimises like the model (`--group-lr feedback=...`).
Both updates of a step come from the same batch and the same parameters (the papers alternate a
forward and a feedback phase on each batch; here they are computed together and applied at once).

- `bidirectional_fa` (Luo, Fu & Glass 2017, "Bidirectional backpropagation: towards biologically
  plausible error signal transmission in neural networks", arXiv:1702.07097, v4 "Adaptive
  bidirectional backpropagation", Sec. 4.1, Eq. 15-29). Forward phase: FA with the learned `B_l`
  (Eq. 18-22). Feedback phase: the feedback weights are the forward weights of a reverse network
  that maps the target back to the input, `g_{L-1} = y*`, `g_{l-1} = f(B_l^T g_l)`,
  `x^ = B_0^T g_0` (Eq. 23-25, `sigma_x` the identity), trained on `0.5 |x^ - x|^2` (Eq. 16) by
  feedback alignment in reverse: the reverse error reaches `g_l` through the *forward* weights,
  `delta_g_l = (W_l delta_{l-1}) * f'` (Eq. 26-28), and `dB_l = g_l delta_{l-1}^T` (Eq. 29, our
  layout). `B_0`, which sends nothing in the forward phase, exists for the reconstruction. For
  conv blocks `B_l^T` is the transposed convolution and max pooling routes the reverse signal by
  the forward pass's selection. The paper absorbs biases into its weights; the reverse pass here
  has none, so the group `feedback` holds one tensor per block, shaped like its weight.
- `bidirectional_dfa` (same paper, Sec. 4.2, Eq. 30-42). Forward phase: DFA with learned
  projections `D_l` (Eq. 36-38). Feedback phase: `D_l y*` predicts block `l`'s output `h_l` under
  the loss `1 - sigmoid(D_l y* . h_l)` (Eq. 40-41), per example and averaged over the batch; `D_l`
  descends its gradient, `-sigmoid'(s) h_l y*^T`, which moves the target class's column of `D_l`
  towards `h_l` ("By -> h", Eq. 48). Eq. 42 prints the update as `-l_i y^T` (the loss value, not
  its gradient); we follow the loss. `feedback_loss=elementwise` applies the sigmoid to each unit,
  `sum_j 1 - sigmoid((D_l y*)_j h_lj)`, the form under which Eq. 42's shape (units x classes)
  makes sense.
- `weight_mirror` (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019, "Deep learning without
  weight transport", NeurIPS, Sec. 4, Eq. 7-9). Forward phase: FA with the learned `B_l`. Mirror
  phase, interleaved with every step: each layer is driven by its own zero-mean noise `xi_l`
  (variance `sigma^2`) and responds with `r_l = W_l xi_l`; the feedback synapses correlate the two,
  `dB = eta_B xi_l r_l^T` (Eq. 7; the notes' `dB_{l+1} = eta_B delta_l delta_{l+1}^T`, with the
  `delta` of mirror mode being this noise-driven activity, not the training errors), whose
  expectation is `eta_B sigma^2 W^T` (Eq. 8). With weight decay (Eq. 9), `dB = eta_B xi r^T -
  lambda B`, `B` settles at `(eta_B sigma^2 / lambda) W`. Our pseudo-gradient is
  `decay * B_l - mean(r_l xi_l^T)` (mean over noise samples and, for a convolution, output
  positions), so with `decay = noise_std^2` (the defaults) it settles at `W_l`; `decay=0` is Eq. 7
  alone. `response=forward` drives the layer's own bias and activation, `r = f(W xi + b)`, as the
  authors' released code does (with a sigmoid), in place of the paper's linear response.

Settings (`--opt`): `init`, `scale`, `feedback_seed` as for feedback alignment (the feedback's
initial values); `feedback_loss` (bidirectional DFA); `noise_std`, `decay`, `response`,
`mirror_batch` (noise samples per step, 0: the batch size) for the weight mirror.
"""

from __future__ import annotations

import math

import torch

from fa_rules.core import Rule, RuleSpec, hookimpl
from fa_rules.core.errors import UserError
from fa_rules.core.feedback import (
    block_output_shapes,
    chained_feedback_gradients,
    check_feedback_network,
    direct_feedback_gradients,
    draw_feedback,
    mirror_gradients,
    one_hot,
    reverse_feedback_gradients,
    weight_key,
)
from fa_rules.core.config import MAX_BATCH
from fa_rules.core.rule import NON_NEGATIVE, POSITIVE, Range
from fa_rules.rules.feedback_alignment import RANDOM_OPTIONS, RANDOM_RANGES, _generator, _random_projections


def _weight_feedback(network, model, blocks, generator, init, scale, feedback_seed) -> dict:
    """One random tensor shaped like each weight of `blocks`, keyed by the weight."""
    gen = _generator(generator, feedback_seed)
    return {weight_key(i): draw_feedback(model[weight_key(i)].shape, init, scale, gen, like=model[weight_key(i)])
            for i in blocks}


def _by_block(network, tensors: dict) -> dict:
    return {network.block_of(k): t for k, t in tensors.items()}


def _ordered(model: dict, grads: dict) -> dict:
    return {k: grads[k] for k in model}


def _classes(network, model) -> int:
    if network.out_shape:  # set by every model family; the output layer otherwise
        return math.prod(network.out_shape)
    return model[weight_key(network.num_blocks - 1)].shape[0]


# -- bidirectional feedback alignment --------------------------------------------------------------
def bidirectional_fa(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1) -> Rule:
    """FA whose feedback weights are trained as a reverse network from the target to the input."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "bidirectional_fa", needs_layers="to run the network backwards through")
        feedback = _weight_feedback(network, params["model"], range(network.num_blocks), generator, init, scale,
                                    feedback_seed)
        return {**params, "feedback": feedback}, {}

    def step(network, params, state, batch):
        model, feedback = params["model"], params["feedback"]
        by_block = _by_block(network, feedback)
        forward_fb = {i: b for i, b in by_block.items() if i > 0}
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, forward_fb)
        feedback_grads, reverse_loss = reverse_feedback_gradients(network, model, by_block, batch.x, batch.y,
                                                                  _classes(network, model))
        updates = {"model": _ordered(model, grads), "feedback": _ordered(feedback, feedback_grads)}
        return updates, state, {"loss": loss, "reverse_loss": reverse_loss}

    return Rule(init=init_fn, step=step, task="classify")


# -- bidirectional direct feedback alignment -------------------------------------------------------
FEEDBACK_LOSSES = ("dot", "elementwise")


def projection_loss_gradient(projection: torch.Tensor, target: torch.Tensor, h: torch.Tensor, form: str):
    """`(d loss / d D, loss)` for `loss = mean_n 1 - sigmoid(s_n)`, `s_n = (D y*_n) . h_n` ("dot"),
    or `mean_n sum_j 1 - sigmoid((D y*_n)_j h_nj)` ("elementwise"); `D`: (units, classes)."""
    h = h.reshape(h.shape[0], -1)
    predicted = target @ projection.T  # (N, units): D y*
    n = h.shape[0]
    if form == "dot":
        s = (predicted * h).sum(1)
        sig = torch.sigmoid(s)
        loss = (1 - sig).mean()
        grad = -((sig * (1 - sig))[:, None] * h).T @ target / n
    elif form == "elementwise":
        sig = torch.sigmoid(predicted * h)
        loss = (1 - sig).sum(1).mean()
        grad = -(sig * (1 - sig) * h).T @ target / n
    else:
        raise UserError(f"unknown feedback_loss '{form}' (use {' or '.join(FEEDBACK_LOSSES)})")
    return grad, loss


def bidirectional_dfa(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1,
                      feedback_loss: str = "dot") -> Rule:
    """DFA whose projections learn to predict each hidden block's output from the target."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "bidirectional_dfa")
        network.require_blocks("bidirectional_dfa", "hidden blocks to project to")
        hidden = range(network.num_blocks - 1)
        projections = _random_projections(network, params["model"], hidden, generator, init, scale, feedback_seed)
        return {**params, "feedback": projections}, {}

    def step(network, params, state, batch):
        model, feedback = params["model"], params["feedback"]
        projections = {int(k.split(".")[1]): d for k, d in feedback.items()}
        outputs: list = []
        grads, loss = direct_feedback_gradients(network, model, batch.x, batch.y, projections, outputs)
        target = one_hot(batch.y, _classes(network, model), batch.x)
        feedback_grads, feedback_losses = {}, []
        for k, d in feedback.items():
            g, l_i = projection_loss_gradient(d, target, outputs[int(k.split(".")[1])], feedback_loss)
            feedback_grads[k] = g
            feedback_losses.append(l_i)
        metrics = {"loss": loss, "feedback_loss": torch.stack(feedback_losses).mean()}
        return {"model": _ordered(model, grads), "feedback": feedback_grads}, state, metrics

    return Rule(init=init_fn, step=step, task="classify")


# -- weight mirror ---------------------------------------------------------------------------------
MIRROR_RESPONSES = ("linear", "forward")


def weight_mirror(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1, noise_std: float = 1.0,
                  decay: float = 1.0, response: str = "linear", mirror_batch: int = 0) -> Rule:
    """FA whose feedback weights learn from noise-driven activity in a mirror phase every step."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "weight_mirror", needs_layers="to drive with mirror noise")
        model = params["model"]
        sending = range(1, network.num_blocks)
        feedback = _weight_feedback(network, model, sending, generator, init, scale, feedback_seed)
        shapes = block_output_shapes(network, model)
        # each sending block's input shape, for its mirror noise (plain tuples: state stays loadable)
        return {**params, "feedback": feedback}, {"noise_shapes": {weight_key(i): tuple(shapes[i - 1]) for i in sending}}

    def step(network, params, state, batch):
        model, feedback = params["model"], params["feedback"]
        by_block = _by_block(network, feedback)
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, by_block)
        generator = batch.generator()
        n = mirror_batch if mirror_batch > 0 else batch.x.shape[0]
        like = model[weight_key(0)]
        noise = {network.block_of(k): torch.randn((n, *shape), generator=generator, device=generator.device)
                 .to(like.dtype).mul_(noise_std) for k, shape in state["noise_shapes"].items()}
        mirror = mirror_gradients(network, model, sorted(by_block), noise, by_block, decay, response)
        return {"model": _ordered(model, grads), "feedback": _ordered(feedback, mirror)}, state, {"loss": loss}

    return Rule(init=init_fn, step=step, task="classify")


@hookimpl
def register_rules(register):
    register(RuleSpec("bidirectional_fa", bidirectional_fa,
                      "FA with feedback trained as a reverse network, target to input (Luo, Fu & Glass 2017)",
                      options=dict(RANDOM_OPTIONS), ranges=RANDOM_RANGES, aliases=("bfa",)))
    register(RuleSpec("bidirectional_dfa", bidirectional_dfa,
                      "DFA with projections trained to predict each block's output (Luo, Fu & Glass 2017)",
                      options={**RANDOM_OPTIONS, "feedback_loss": "dot"},
                      ranges={**RANDOM_RANGES, "feedback_loss": FEEDBACK_LOSSES}, aliases=("bdfa",)))
    register(RuleSpec("weight_mirror", weight_mirror,
                      "FA with feedback learned from noise in a mirror phase (Akrout et al. 2019)",
                      options={**RANDOM_OPTIONS, "noise_std": 1.0, "decay": 1.0, "response": "linear",
                               "mirror_batch": 0},
                      ranges={**RANDOM_RANGES, "noise_std": POSITIVE, "decay": NON_NEGATIVE,
                              "response": MIRROR_RESPONSES,
                              "mirror_batch": Range(0, MAX_BATCH, note="0: the training batch size")}))
