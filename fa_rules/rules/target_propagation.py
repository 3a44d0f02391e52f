"""Target propagation: `target_prop`, `dtp`, `iterative_dtp` and `l_drl`.

Papers (see `papers/` beside the design guide):

- Bengio (2014), "How auto-encoders could provide credit assignment in deep networks via target
  propagation": targets instead of errors travel down a learned feedback path of per-layer
  auto-encoders, `tau_{l-1} = g_l(tau_l)`.
- Lee, Zhang, Fischer & Bengio (2015), "Difference target propagation": the difference correction
  `tau_{l-1} = h_{l-1} + g_l(tau_l) - g_l(h_l)`, and the decoders' noise-corrupted reconstruction
  objective `|| g_l(f_l(h_{l-1} + eps)) - (h_{l-1} + eps) ||^2`, `eps ~ N(0, sigma^2)`.
- Bengio (2020), "Deriving differential target propagation from iterating approximate inverses"
  (the seed paper; numbers below are its sections): top target `tau_L = h_L - beta dL/dh_L^T`
  (sec. 3, eq. target-prop); the normalised DTP1 update, for `f_l(h) = W sigma(h)`,
  `Delta W_l = (tau_l - h_l) sigma(h_{l-1})^T / ||sigma(h_{l-1})||^2` (sec. 3, eq. delta-dtp-regular,
  the closed form of eq. delta-dtp); decoder-input correction `u_t = u_{t-1} + tau_l - f_l(g_l(u_{t-1}))`
  (sec. 5, eq. u-recurrence); decoder-output correction
  `tau_{l-1} <- tau_{l-1} + g_l(tau_l) - g_l(f_l(tau_{l-1}))` (sec. 6.2, eq. iterative-tau-out-update);
  per-layer influence scaling `||tau_L - h_L||^2 / ||tau_l - h_l||^2` (sec. 8); decoders trained
  first, then targets, then forward weights (sec. 9, algorithm); the regular auto-encoder objective
  `g o f ~ I` as the first choice, the reverse one `f o g ~ I` as the alternative (sec. 10.2).
- Ernoult, Normandin, Moudgil, Spinney, Belilovsky, Rish, Richards & Bengio (2022), "Towards
  scaling difference target propagation by learning backprop targets", ICML: the local difference
  reconstruction loss (L-DRL) `E[-2 eps^T (g(f(h + eps)) - g(f(h))) + ||g(f(h) + eta) - g(f(h))||^2]`,
  `eps, eta ~ N(0, sigma^2)`, whose minimiser has `J_g = J_f^T` (to second order it is
  `sigma^2 ||J_g - J_f^T||_F^2` + const), so that DTP's difference targets become backprop's
  (`l_drl`: `dtp` with `feedback_objective=ldrl`, loss divided by `sigma^2`, no input
  normalisation). Its `feedback_lr` defaults to 0.05: one batch of 64 noise samples estimates a
  256 x 256 Jacobian with rank 64, so a large step tracks the sampling noise (digits, 5 epochs:
  hidden angles to backprop 90/93 degrees at 0.5, 32/26 at 0.05).

Lee et al.'s Algorithm 1 differs from the seed paper's in two places, both settings of `dtp` and
`l_drl`: `first_target=penultimate` sets the first target on the last hidden value,
`h_{L-1} - beta dl/dh_{L-1}` computed exactly through the output block, and gives the output block no
decoder (`output` sets it on the logits and carries it down through an output decoder, as the
seed paper's algorithm does); `decoder_order=after` computes the targets with the decoders as they
were (fitted one step earlier) and trains them afterwards, where the default `before` trains them
first (seed paper, sec. 9). In a pure rule "after" is exactly this: the decoders trained in step t
fit the weights of step t and are used by the targets of step t + 1. Defaults, from measurements
(docs/rules/target-propagation.md): `dtp` sets the first target on the penultimate layer (better
in every one of 3 seeds on Fashion-MNIST and on digits); `l_drl` on the output, as Ernoult et al.
do; both train the decoders first (`after` is within a seed's noise).

How a step runs (all three rules share it; they differ only in how a target is carried down):

1. Forward pass `h_0 = x, h_1, ..., h_L` in the chosen `space` ("post": block outputs, the form of
   Lee et al.; "pre": block pre-activations, the form `f_l(h) = W sigma(h)` of the seed paper; see
   `fa_rules.core.inverse`). No graph is kept.
2. Feedback training. Every block l >= 1 has a decoder `g_l` (block 0's input gets no target, so
   it has none) built from the block type (Linear -> Linear with activation). Its parameters live
   in the rule's `state["feedback"]`, not in an engine parameter group, because the papers train
   them with their own learning rate and several iterations per step: `feedback_iters` plain SGD
   steps (default 1: one decoder step per batch) of size `feedback_lr` on the reconstruction loss
   (`feedback_objective`: "autoencoder", `g(f(h + eps)) ~ h + eps`, "reverse",
   `f(g(h + eps)) ~ h + eps`, or "ldrl", Ernoult et al.'s L-DRL above), fresh noise of scale
   `feedback_noise` each iteration, gradients by `fa_rules.core.grad` with respect to the decoder
   only. With `feedback_normalise` (default) each decoder's loss is divided by the mean squared norm
   of its input (+1 for the bias), a normalised LMS step whose size does not depend on the scale of
   the layer (the same normalisation as the seed paper's DTP1 and decoder updates, secs. 3 and 9).
   The decoders are trained before the targets are computed, as in the seed paper's algorithm, so
   the targets use decoders fitted to the current forward weights.
3. Targets. `tau_L = h_L - beta * dl/dh_L` with `l` the per-example cross-entropy (so `beta` does
   not depend on the batch size), then for l = L..2:
   - `target_prop`: `tau_{l-1} = g_l(tau_l)`;
   - `dtp`: `tau_{l-1} = h_{l-1} + g_l(tau_l) - g_l(h_l)`;
   - `iterative_dtp`: `input_iters` decoder-input corrections `u <- u + y - f_l(g_l(u))` give, for
     `y = tau_l`, a `u_tau` with `f_l(g_l(u_tau)) ~ tau_l` (sec. 5). The start point is `g_l(u_tau)`
     (`output_init="decoder"`, the seed paper, secs. 6.1/6.2) or the difference form
     `h_{l-1} + g_l(u_tau) - g_l(u_h)`, where `u_h` is the same correction run for `y = h_l`
     (`output_init="difference"`; with `input_iters=0` it is the DTP target). Correcting both
     terms alike matters: `g_l(u_tau) - g_l(h_l)` would carry the reverse auto-encoder error
     `f_l(g_l(h_l)) - h_l`, which does not shrink with beta. Then `output_iters` decoder-output
     corrections (sec. 6.2). So `dtp` is `iterative_dtp` with `input_iters=output_iters=0,
     output_init="difference"`, and `target_prop` the same with `output_init="decoder"`.
4. Forward updates with no graph across blocks. Each block is trained on its local loss
   `sum_n w_n ||f_l(h_{l-1,n}) - tau_{l,n}||^2 / (2 beta N)` by `fa_rules.core.grad` with respect
   to its own parameters (inputs and targets are constants, so one `grad` of the sum of the local
   losses gives each block exactly its own gradient); the pseudo-gradient goes to the engine's
   optimiser. The `1/beta` makes updates the size of gradients (beta only sets how far targets reach). With
   `dtp1` (iterative_dtp, "pre" space, Linear blocks) hidden blocks instead get the DTP1 update of
   eq. delta-dtp averaged over the batch, `-(1/beta) mean_n w_n (tau_n - h_n) [z_n; 1]^T /
   (||z_n||^2 + 1)` with `z = sigma(h_{l-1})` the block's input and `[.; 1]` the bias column (the
   exact `J^T (J J^T)^{-1}` of the paper for weights and bias; without a bias it is eq.
   delta-dtp-regular itself), sign flipped so the optimiser's descent moves `h_l` toward `tau_l`.
   `w_n = 1`, or with `influence_scaling` the sec. 8 factor `||tau_L - h_L||^2 / ||tau_l - h_l||^2`,
   per example as in the paper ("example") or as one ratio of batch sums ("batch", the default of
   iterative_dtp). Under Adam a constant factor per layer cancels, so there the setting mostly
   reweights examples; under SGD it sets the per-layer step sizes as sec. 8 intends.

The output (last) block: its target is `tau_L`, so its local loss gradient is exactly its true
gradient of the cross-entropy (`h_L - tau_L = beta dl/dh_L`, and the `1/beta` cancels): the last
layer is trained by its true local gradient, as in Lee et al. With `dtp1_output` it gets the DTP1
update instead, as in the seed paper's algorithm (sec. 9, "for all l").

Choices where the papers leave room or disagree, each a setting (measured on digits with the
default tanh MLP 64-256-256-10; see docs/rules/target-propagation.md):

- `space`: "post" (Lee et al.'s targets on block outputs) is the default of all three rules. The
  seed paper's form ("pre") is required by `dtp1`, because its closed form needs a block that is
  linear in its parameters. With tanh it trains well without iterations, but the iterations are
  unstable there: a decoder cannot recover a saturated pre-activation from `tanh` of it, so the
  corrections push targets out along directions the block does not respond to.
- `output_init`: the seed paper starts the sec. 6.2 iteration at `g_l(tau_l)`; the default
  "difference" starts at the DTP target, which stays near `h_{l-1}` in directions no decoder can
  reconstruct (the top decoder maps 10 logits to 256 units, so `g_L o f_L - I` is not contracting
  there: the iteration leaves those components where it starts).
- `influence_scaling`: the per-example form of sec. 8 is unstable in practice (examples whose
  target change is tiny get huge weights; sec. 10.4 warns of this); the batch form is stable.
- `beta`: plain `target_prop` targets carry the decoders' reconstruction error, which does not
  shrink with beta, so the output signal must be large enough to dominate it: its default is
  5.0 (at 0.5 the hidden layers collapse onto the decoders' image and accuracy falls to chance);
  the difference-corrected rules use 0.5.
- `per_block_grads`: every block's local loss (and every decoder's) is independent of the others,
  so one `grad` of their sum gives each its own gradient (the default: fewest calls, fastest), but
  then every block's graph is alive at once and the peak of tensors saved for backward grows with
  depth as backprop's does. With `per_block_grads=true` each block (and decoder) gets its own
  `grad` call, whose graph is freed before the next: the same updates to float rounding, and the
  memory of one block, which is what a layer-local rule needs (measured in
  benchmarks/reports/memory_depth.md).

`evaluate` adds, per block with a decoder (blocks 1..L-1, in order): `feedback_recon_error` (mean
squared error of `g_l(f_l(h_{l-1}))` against `h_{l-1}`, no noise), `feedback_reverse_error` (of
`f_l(g_l(h_l))` against `h_l`) and `target_inversion_error` (`||f_l(tau_{l-1}) - tau_l|| /
||tau_l - h_l||` over the batch: 0 for a perfect inverse, 1 as bad as no target change). The
alignment angle to backprop per block comes from the engine (`alignment_angle_deg`).

Convolutional networks (`lenet`, `vgg` without batch norm, `simple_vgg`; Ernoult et al. 2022 train
L-DRL on their SimpleVGG): a conv block's decoder is a transposed convolution that restores the
block's input shape exactly; a max-pool post is inverted by max-unpooling with the indices of the
forward pass that produced the decoded value (`fa_rules.core.inverse.forward_pass` and `encode(...,
with_indices=True)` recompute the pool with its indices: the clean forward's for `g(h)`, `g(h +
eta)` and `g(tau)`, the noisy forward's for `g(f(h + eps))`, as the authors' code does); the
flatten is inverted by the reshape every decoder ends with. `conv_decoder` picks the conv decoder's
form: "reversed_block" (the authors': `V * sigma_l(unpool(h)) + c`, the default of `l_drl`) or
"activation_below" (`sigma_{l-1}(V * unpool(h) + c)`, the dense decoders' form; the default of the
rules trained by the auto-encoder objective, measured on LeNet: digits, 5 epochs, seed 0, dtp 0.867
against 0.492, target_prop 0.717 against 0.375, iterative_dtp 0.858 against 0.492; l_drl 0.878
against 0.875). `feedback_per_decoder`
("LR:NOISE:ITERS, ..." from the bottom decoder up) replaces `feedback_lr`, `feedback_noise` and
`feedback_iters` per decoder, as Ernoult et al. tune them per layer; a decoder stops after its own
number of iterations, and the noise of the decoders still training is drawn bottom-up in each.
`dtp1` refuses conv blocks (its closed form needs a Linear block); `space=pre` refuses pools.
Needs a plain chain of blocks (no heads).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fa_rules.core import Rule, RuleSpec, UserError, classification_loss, grad, hookimpl
from fa_rules.core.rule import ITERATIONS, NON_NEGATIVE, POSITIVE
from fa_rules.core.inverse import (
    CONV_DECODERS, SPACES, Decoder, activate, decoder_for, encode, forward_pass, value_shapes,
)

try:  # data-parallel runs: in-step training must see the global batch (identity in one process)
    from fa_rules.core.distributed import average_across_processes
except ImportError:  # an engine without distributed training

    def average_across_processes(tree):
        return tree

OBJECTIVES = ("autoencoder", "reverse", "ldrl")
# the zoo models every rule of the family trains: MLPs and the chains of conv blocks (max pools
# unpooled, the flatten reshaped); batch norm has no decoder, so vgg is built without it
MODELS = ("mlp", "lenet", "vgg", "simple_vgg")
MODEL_DEFAULTS = {"activation": "tanh", "batch_norm": False}
FIRST_TARGETS = ("output", "penultimate")
DECODER_ORDERS = ("before", "after")
OUTPUT_INITS = ("difference", "decoder")
INFLUENCE = ("none", "example", "batch")


@dataclass(frozen=True)
class Settings:
    """Everything a step needs; built (and checked) by the rule builders below."""

    beta: float
    space: str
    feedback_lr: float
    feedback_iters: int
    feedback_noise: float
    feedback_objective: str
    feedback_normalise: bool
    input_iters: int = 0
    output_iters: int = 0
    output_init: str = "difference"
    dtp1: bool = False
    dtp1_output: bool = False
    influence_scaling: str = "none"
    first_target: str = "output"
    decoder_order: str = "before"
    per_block_grads: bool = False
    conv_decoder: str = "reversed_block"
    feedback_per_decoder: str = ""

    def check(self) -> "Settings":
        """What depends on several settings (each one's range is declared in `RANGES`)."""
        per_decoder = parse_per_decoder(self.feedback_per_decoder)
        noises = [b.noise for b in per_decoder] or [self.feedback_noise]
        if self.feedback_objective == "ldrl" and not all(n > 0 for n in noises):
            raise UserError("feedback_objective=ldrl needs feedback_noise > 0 (it measures Jacobians with noise)")
        if (self.dtp1 or self.dtp1_output) and self.space != "pre":
            raise UserError("dtp1 is the update for f(h) = W sigma(h): it needs space=pre")
        return self


# every setting's declared range (checked by the registered specs, `RuleSpec.check_options`)
RANGES = {
    "beta": POSITIVE, "space": SPACES, "feedback_lr": NON_NEGATIVE, "feedback_iters": ITERATIONS,
    "feedback_noise": NON_NEGATIVE, "feedback_objective": OBJECTIVES, "input_iters": ITERATIONS,
    "output_iters": ITERATIONS, "output_init": OUTPUT_INITS, "influence_scaling": INFLUENCE,
    "first_target": FIRST_TARGETS, "decoder_order": DECODER_ORDERS, "conv_decoder": CONV_DECODERS,
}


@dataclass(frozen=True)
class BlockFeedback:
    """One decoder's training in a step: SGD step size, noise scale and number of iterations."""

    lr: float
    noise: float
    iters: int


def parse_per_decoder(text: str) -> list[BlockFeedback]:
    """`feedback_per_decoder`: `"LR:NOISE:ITERS, ..."`, one triple per decoder from the bottom up
    (`"1e-4:0.4:20, 0.18:0.08:20"`); empty: none. A bad entry is a one-line UserError."""
    if not text.strip():
        return []
    out = []
    for item in text.split(","):
        parts = [p.strip() for p in item.split(":")]
        try:
            lr, noise, iters = float(parts[0]), float(parts[1]), int(parts[2])
            ok = len(parts) == 3 and lr in NON_NEGATIVE and noise in NON_NEGATIVE and iters in ITERATIONS
        except (ValueError, IndexError):
            ok = False
        if not ok:
            raise UserError(f"feedback_per_decoder takes LR:NOISE:ITERS per decoder from the bottom, comma-separated "
                            f"(e.g. \"1e-4:0.4:20, 0.18:0.08:20\"; lr and noise in {NON_NEGATIVE.describe(False)}, "
                            f"iters in {ITERATIONS.describe(True)}); got {item.strip()!r}")
        out.append(BlockFeedback(lr, noise, iters))
    return out


def feedback_schedule(s: "Settings", blocks: list[int]) -> dict[int, BlockFeedback]:
    """Each decoder's (lr, noise, iterations): `feedback_lr`, `feedback_noise`, `feedback_iters`
    for all, or per decoder from `feedback_per_decoder` (Ernoult et al. tune them per layer on
    SimpleVGG)."""
    per_decoder = parse_per_decoder(s.feedback_per_decoder)
    if not per_decoder:
        return {i: BlockFeedback(s.feedback_lr, s.feedback_noise, s.feedback_iters) for i in blocks}
    if len(per_decoder) != len(blocks):
        raise UserError(f"feedback_per_decoder lists {len(per_decoder)} decoders; this network trains {len(blocks)} "
                        f"(blocks {', '.join(map(str, blocks))}): give one LR:NOISE:ITERS each, from the bottom")
    return dict(zip(blocks, per_decoder))


def independent_grads(loss_of, params: dict, per_block: bool) -> dict:
    """`{key: gradient of loss_of(key, params[key])}` for losses that each involve only their own
    parameters: one `grad` of their sum (fewest calls), or with `per_block` one `grad` per key,
    whose graph is freed before the next (the memory of one; `per_block_grads`)."""
    if per_block:
        return {key: grad(functools.partial(loss_of, key))(p) for key, p in params.items()}
    return grad(lambda ps: sum(loss_of(key, p) for key, p in ps.items()))(params)


# -- decoders -----------------------------------------------------------------------------------
_DECODERS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def decoders(network, space: str, conv_decoder: str = "reversed_block") -> list[Decoder | None]:
    """`[None, g_1, ..., g_{L-1}]` for the network (cached per network: building needs a forward)."""
    per_network = _DECODERS.setdefault(network, {})
    key = (space, conv_decoder)
    if key not in per_network:
        shapes = value_shapes(network)
        per_network[key] = [None] + [decoder_for(network, i, space, shapes, conv_decoder)
                                     for i in range(1, network.num_blocks)]
    return per_network[key]


def no_indices(values) -> list[None]:
    """The max-pool indices of a network without pools (every decoder call takes them)."""
    return [None] * len(values)


def decoder_blocks(network, s: "Settings") -> list[int]:
    """Blocks whose decoder carries a target down: 1..L-1, or 1..L-2 when the first target is set
    on the last hidden value directly (`first_target=penultimate`: no decoder on the output block)."""
    top = network.num_blocks - (2 if s.first_target == "penultimate" else 1)
    return list(range(1, top + 1))


def block_params(network, model, i: int) -> dict:
    return {k: model[k] for k in network.block_keys[i]}


def _mean_sq_norm(decoder: Decoder, h: torch.Tensor, indices=None) -> torch.Tensor:
    """Mean over the batch of the squared norm of one decoder unit's input (its fan-in), + 1 for the
    bias; for a transposed convolution, of a kernel-sized patch of its (unpooled) input."""
    z = decoder.layer_input(h, indices).detach()
    sq = z.pow(2).flatten(1).sum(1).mean()
    if decoder.kind == "conv_transpose":  # one unit sees a kernel-sized patch of the input
        sq = sq / (z.shape[-2] * z.shape[-1]) * (decoder.kernel_size[0] * decoder.kernel_size[1])
    return sq + 1.0


def reconstruction_loss(network, model, i, decoder, dec_params, x, objective, space, scale=1.0, code=None,
                        indices=None):
    """Half squared reconstruction error of decoder i on the (noisy) values `x` (mean over the
    batch) divided by `scale`: `g(f(x)) ~ x` for the auto-encoder objective, where `x` lies below
    block i (`code`, if given, is `f(x)` and `indices` its pooling indices), or `f(g(x)) ~ x` for
    the reverse one, where `x` lies above it (`indices`: those of the clean forward pass)."""
    bp = block_params(network, model, i)
    if objective == "autoencoder":
        if code is None:
            code, indices = encode(network, i, bp, x, space, with_indices=True)
        err = decoder(dec_params, code.detach(), indices) - x
    else:
        err = encode(network, i, bp, decoder(dec_params, x, indices), space) - x
    return 0.5 * err.pow(2).flatten(1).sum(1).mean() / scale


def difference_reconstruction_loss(decoder, dec_params, code, code_moved, input_noise, output_noise, sigma,
                                   indices=None, moved_indices=None):
    """Ernoult et al. 2022's local difference reconstruction loss (L-DRL) of one decoder, halved:
    `1/2 E[-2 eps^T (g(f(h + eps)) - g(f(h))) + ||g(f(h) + eta) - g(f(h))||^2] / sigma^2`, with
    `code = f(h)`, `code_moved = f(h + eps)` (constants), `eps`, `eta ~ N(0, sigma^2)`. To second
    order in the noise it is `1/2 ||J_g - J_f^T||_F^2` up to a constant, so it drives the decoder's
    Jacobian to the transpose of the block's: DTP's targets then become backprop's. On a pooled
    block each value is unpooled with the indices of the forward pass that made it (as Ernoult et
    al.'s code does): `moved_indices` those of `f(h + eps)`, `indices` those of `f(h)`."""
    g_code = decoder(dec_params, code, indices)
    recon = (decoder(dec_params, code_moved, moved_indices) - g_code) * input_noise
    spread = (decoder(dec_params, code + output_noise, indices) - g_code).pow(2)
    per_example = -2 * recon.flatten(1).sum(1) + spread.flatten(1).sum(1)
    return 0.5 * per_example.mean() / sigma**2


def _active(schedule: dict[int, BlockFeedback], t: int) -> list[int]:
    """The decoders still training at iteration t (each stops after its own number of iterations)."""
    return [i for i, b in schedule.items() if b.iters > t]


def _sgd_step(params, g, schedule):
    return {**params, **{b: {k: v - schedule[int(b)].lr * g[b][k] for k, v in params[b].items()} for b in g}}


def _train_ldrl(network, model, params, values, s, schedule, decs, generator, indices):
    for t in range(max(b.iters for b in schedule.values())):
        inputs = {}
        for i in _active(schedule, t):
            h, sigma = values[i], schedule[i].noise
            bp = block_params(network, model, i)
            eps = sigma * torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
            code = values[i + 1]
            moved, moved_indices = encode(network, i, bp, h + eps, s.space, with_indices=True)
            eta = sigma * torch.randn(code.shape, generator=generator, device=h.device, dtype=h.dtype)
            inputs[i] = (code, moved.detach(), eps, eta, indices[i + 1], moved_indices)

        def decoder_loss(key, p, _inputs=inputs):
            code, moved, eps, eta, idx, moved_idx = _inputs[int(key)]
            return difference_reconstruction_loss(decs[int(key)], p, code, moved, eps, eta,
                                                  schedule[int(key)].noise, idx, moved_idx)

        active = {str(i): params[str(i)] for i in inputs}
        g = average_across_processes(independent_grads(decoder_loss, active, s.per_block_grads))
        params = _sgd_step(params, g, schedule)
    return params


def train_feedback(network, model, feedback, values, s: Settings, generator, indices=None):
    """`feedback_iters` SGD steps on every decoder's reconstruction loss; returns new parameters.
    Each decoder's loss involves only its own parameters, so one `grad` call over their sum gives
    every decoder its own gradient (fewer calls, same result; `per_block_grads`: one call each). In
    a data-parallel run each gradient and normaliser is averaged over the processes, so every
    process takes the step one process would take on the whole batch. `indices`: the max-pool
    indices of the forward pass (`forward_pass`), needed where a block pools."""
    decs = decoders(network, s.space, s.conv_decoder)
    indices = indices or no_indices(values)
    autoencoder = s.feedback_objective == "autoencoder"
    blocks = decoder_blocks(network, s)
    if not blocks:  # one hidden block with the first target on it: nothing to train
        return {}
    params = {str(i): feedback[str(i)] for i in blocks}
    schedule = feedback_schedule(s, blocks)
    if s.feedback_objective == "ldrl":
        return _train_ldrl(network, model, params, values, s, schedule, decs, generator, indices)
    for t in range(max(b.iters for b in schedule.values())):
        inputs = {}
        for i in _active(schedule, t):  # noisy inputs, codes and normalisers: constants of the loss below
            clean = values[i] if autoencoder else values[i + 1]
            x = clean + schedule[i].noise * torch.randn(
                clean.shape, generator=generator, device=clean.device, dtype=clean.dtype
            )
            code, idx = None, indices[i + 1]  # reverse: g(x) unpools with the clean forward's indices
            if autoencoder:  # g(f(x)) unpools with the indices of the noisy forward f(x)
                code, idx = encode(network, i, block_params(network, model, i), x, s.space, with_indices=True)
                code = code.detach()
            scale = 1.0
            if s.feedback_normalise:  # by the decoder's input: f(x) for the auto-encoder, else x
                scale = average_across_processes(_mean_sq_norm(decs[i], code if autoencoder else x, idx))
            inputs[i] = (x, scale, code, idx)

        def decoder_loss(key, p, _inputs=inputs):
            x, scale, code, idx = _inputs[int(key)]
            return reconstruction_loss(network, model, int(key), decs[int(key)], p, x, s.feedback_objective,
                                       s.space, scale, code, idx)

        active = {str(i): params[str(i)] for i in inputs}
        g = average_across_processes(independent_grads(decoder_loss, active, s.per_block_grads))
        params = _sgd_step(params, g, schedule)
    return params


# -- targets ------------------------------------------------------------------------------------
def output_delta(network, values, y, space) -> torch.Tensor:
    """Per-example gradient of the cross-entropy with respect to the top value h_L."""
    last = network.num_blocks - 1

    def loss_fn(h):
        out = activate(network, last, h) if space == "pre" else h
        return classification_loss(out, y) * h.shape[0]

    return grad(loss_fn)(values[-1])


def carry_down(network, model, i, decoder, dec_params, tau, values, s: Settings, indices=None) -> torch.Tensor:
    """The target for the value below block i, given block i's target `tau` (see module docstring).
    On a pooled block, values in block i's output space unpool with the clean forward's indices
    (`indices[i + 1]`), and `g(f(x))` with those of the forward pass `f(x)`."""
    bp = block_params(network, model, i)
    clean = (indices or no_indices(values))[i + 1]

    def g(v, idx):
        return decoder(dec_params, v, idx)

    def f(v):
        return encode(network, i, bp, v, s.space, with_indices=True)

    def decode_corrected(y, idx):  # sec. 5: g(u) with f(g(u)) ~ y, by correcting the decoder's input
        u, g_u = y, g(y, idx)
        g_y = g_u
        for _ in range(s.input_iters):
            u = u + y - f(g_u)[0]
            g_u = g(u, idx)
        return g_u, g_y

    n = tau.shape[0]
    if s.output_init == "difference":  # the same decoder, corrected the same way, at h_l
        # tau and h_l go through the decoder as one batch: the same numbers, half the calls
        both = None if clean is None else torch.cat([clean, clean])
        decoded, g_y = decode_corrected(torch.cat([tau, values[i + 1]]), both)
        x = values[i] + decoded[:n] - decoded[n:]
        g_tau = g_y[:n]
    else:
        x, g_tau = decode_corrected(tau, clean)
    for _ in range(s.output_iters):  # sec. 6.2: correct the decoder's output
        x = x + g_tau - g(*f(x))
    return x


def penultimate_delta(network, model, values, y, space) -> torch.Tensor:
    """Per-example gradient of the cross-entropy with respect to the last hidden value h_{L-1}."""
    last = network.num_blocks - 1
    bp = block_params(network, model, last)

    def loss_fn(h):
        top = encode(network, last, bp, h, space)
        out = activate(network, last, top) if space == "pre" else top
        return classification_loss(out, y) * h.shape[0]

    return grad(loss_fn)(values[-2])


def compute_targets(network, model, feedback, values, y, s: Settings, indices=None) -> list[torch.Tensor | None]:
    """`[None, tau_1, ..., tau_L]` aligned with `values` (the input gets no target). The output
    target always trains the output block (its local loss gradient is its true gradient); with
    `first_target=penultimate` the last hidden value's target is computed exactly, as in Lee et
    al.'s Algorithm 1, and decoders carry targets down from there. `indices`: the forward pass's
    max-pool indices (`forward_pass`), needed where a block pools."""
    decs = decoders(network, s.space, s.conv_decoder)
    top = values[-1] - s.beta * output_delta(network, values, y, s.space)
    targets = [None] * len(values)
    targets[-1] = top.detach()
    blocks = decoder_blocks(network, s)
    if s.first_target == "penultimate" and network.num_blocks > 1:
        targets[-2] = (values[-2] - s.beta * penultimate_delta(network, model, values, y, s.space)).detach()
    for i in reversed(blocks):
        targets[i] = carry_down(network, model, i, decs[i], feedback[str(i)], targets[i + 1], values, s,
                                indices).detach()
    return targets


# -- forward updates ----------------------------------------------------------------------------
def influence_weights(targets, values, i, mode: str) -> torch.Tensor:
    """Sec. 8: ||tau_L - h_L||^2 / ||tau_l - h_l||^2 for block i (value index i + 1), per example
    ("example", the paper's form) or as one ratio of batch means ("batch")."""
    top = (targets[-1] - values[-1]).pow(2).flatten(1).sum(1)
    here = (targets[i + 1] - values[i + 1]).pow(2).flatten(1).sum(1)
    if mode == "batch":  # ratio of batch means (of the global batch in a data-parallel run)
        top, here = average_across_processes((top.mean(), here.mean()))
        top, here = top.expand(len(values[-1])), here.expand(len(values[-1]))
    return top / here.clamp_min(torch.finfo(here.dtype).tiny)


def dtp1_update(network, model, i, tau, values, weights, beta) -> dict:
    """Pseudo-gradient of the DTP1 update (eq. delta-dtp) for Linear block i in the "pre" space."""
    layer = network.blocks[i].layer
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"dtp1 needs Linear blocks; block {i} is {type(layer).__name__}")
    z = values[i] if i == 0 else activate(network, i - 1, values[i])
    z = z.reshape(z.shape[0], -1)
    has_bias = layer.bias is not None
    denom = z.pow(2).sum(1) + (1.0 if has_bias else 0.0)
    delta = (tau - values[i + 1]) * (weights / (denom * z.shape[0]))[:, None]
    local = {"layer.weight": -(delta.T @ z) / beta}
    if has_bias:
        local["layer.bias"] = -delta.sum(0) / beta
    return {k: local[lk] for k, lk in network.block_keys[i].items()}


def local_loss(network, bp, i, tau, inp, weights, s: Settings) -> torch.Tensor:
    """Block i's local loss `sum_n w_n ||f_i(h_{i-1,n}) - tau_{i,n}||^2 / (2 beta N)`."""
    err = (encode(network, i, bp, inp, s.space) - tau).pow(2).flatten(1).sum(1)
    return (weights * err).sum() / (2 * s.beta * inp.shape[0])


def forward_updates(network, model, targets, values, s: Settings) -> dict:
    """Every block's pseudo-gradient: DTP1's closed form, or the gradient of its local loss with
    respect to its own parameters. Inputs and targets are constants, so no graph crosses blocks,
    and one `grad` call over the sum of the local losses gives each block its own gradient
    (`per_block_grads`: one call per block)."""
    last = network.num_blocks - 1
    updates, local = {}, {}
    for i in range(network.num_blocks):
        if s.influence_scaling != "none" and i < last:
            w = influence_weights(targets, values, i, s.influence_scaling)
        else:
            w = torch.ones(values[0].shape[0], device=values[0].device, dtype=values[-1].dtype)
        if s.dtp1 and (i < last or s.dtp1_output):
            updates.update(dtp1_update(network, model, i, targets[i + 1], values, w, s.beta))
        else:
            local[i] = w

    def block_loss(key, p):
        i = int(key)
        return local_loss(network, p, i, targets[i + 1], values[i], local[i], s)

    if local:
        params = {str(i): block_params(network, model, i) for i in local}
        for g in independent_grads(block_loss, params, s.per_block_grads).values():
            updates.update(g)
    return {k: updates[k] for k in model}


# -- the rule -----------------------------------------------------------------------------------
def _check_network(network) -> None:
    if len(network.heads):
        raise ValueError("target propagation rules need a plain chain of blocks (this network has heads)")
    if network.num_blocks < 1:
        raise ValueError("the network has no blocks")


def _check_settings_fit(network, s: Settings) -> None:
    """Settings that need a block type the network lacks, refused in one line before any run."""
    if s.dtp1 or s.dtp1_output:
        for i, block in enumerate(network.blocks):
            if not isinstance(block.layer, nn.Linear) and (i < network.num_blocks - 1 or s.dtp1_output):
                raise UserError(f"dtp1 is the closed-form update of a Linear block (f(h) = W sigma(h)); block {i} "
                                f"is {type(block.layer).__name__}: use dtp1=false on this model")


def _output(network, values, space):
    return activate(network, network.num_blocks - 1, values[-1]) if space == "pre" else values[-1]


def _build(s: Settings) -> Rule:
    s.check()

    def init(network, params, generator):
        _check_network(network)
        _check_settings_fit(network, s)
        feedback_schedule(s, decoder_blocks(network, s))  # one value per decoder, or a one-line refusal
        reference = next(iter(params["model"].values()))
        feedback = {}
        try:
            decs = decoders(network, s.space, s.conv_decoder)
        except ValueError as e:  # a block no decoder can mirror: the user's model or settings
            raise UserError(f"no feedback decoders for this network: {e}") from None
        for i in decoder_blocks(network, s):
            feedback[str(i)] = decs[i].init(generator, device=reference.device, dtype=reference.dtype)
        return params, {"feedback": feedback}

    def step(network, params, state, batch):
        model = params["model"]
        # Nothing outside the `grad` calls needs a graph (they make their own; torch.func ignores
        # an outer no_grad), and recording one for every decoder call would double the step's cost.
        with torch.no_grad():
            values, indices = forward_pass(network, model, batch.x, s.space)
            trained = train_feedback(network, model, state["feedback"], values, s, batch.generator(), indices)
            # before: targets from decoders fitted to the current weights (seed paper, sec. 9);
            # after: from the decoders of the previous step, then fitted (Lee et al., Algorithm 1)
            feedback = trained if s.decoder_order == "before" else state["feedback"]
            targets = compute_targets(network, model, feedback, values, batch.y, s, indices)
            feedback = trained
            updates = forward_updates(network, model, targets, values, s)
            loss = classification_loss(_output(network, values, s.space), batch.y)
        return {"model": updates}, {**state, "feedback": feedback}, {"loss": loss}

    @torch.no_grad()
    def evaluate(network, params, state, batch):
        model, feedback = params["model"], state["feedback"]
        values, indices = forward_pass(network, model, batch.x, s.space)
        targets = compute_targets(network, model, feedback, values, batch.y, s, indices)
        decs = decoders(network, s.space, s.conv_decoder)
        recon, reverse, inversion = [], [], []
        for i in decoder_blocks(network, s):
            bp = block_params(network, model, i)
            back = decs[i](feedback[str(i)], values[i + 1], indices[i + 1])
            recon.append(float((back - values[i]).pow(2).mean()))
            reverse.append(float((encode(network, i, bp, back, s.space) - values[i + 1]).pow(2).mean()))
            reached = encode(network, i, bp, targets[i], s.space)
            change = (targets[i + 1] - values[i + 1]).norm()
            inversion.append(float((reached - targets[i + 1]).norm() / change) if change > 0 else 0.0)
        return {"feedback_recon_error": recon, "feedback_reverse_error": reverse, "target_inversion_error": inversion}

    return Rule(init=init, step=step, task="classify", evaluate=evaluate)


# -- builders -----------------------------------------------------------------------------------
def target_prop(
    beta: float = 5.0, space: str = "post", feedback_lr: float = 1.0, feedback_iters: int = 1,
    feedback_noise: float = 0.3, feedback_objective: str = "autoencoder", feedback_normalise: bool = True,
    per_block_grads: bool = False, conv_decoder: str = "activation_below", feedback_per_decoder: str = "",
) -> Rule:
    """Plain target propagation (Bengio 2014): tau_{l-1} = g_l(tau_l)."""
    return _build(Settings(beta, space, feedback_lr, feedback_iters, feedback_noise, feedback_objective,
                           feedback_normalise, output_init="decoder", per_block_grads=per_block_grads,
                           conv_decoder=conv_decoder, feedback_per_decoder=feedback_per_decoder))


def dtp(
    beta: float = 0.5, space: str = "post", feedback_lr: float = 1.0, feedback_iters: int = 1,
    feedback_noise: float = 0.3, feedback_objective: str = "autoencoder", feedback_normalise: bool = True,
    first_target: str = "penultimate", decoder_order: str = "before", per_block_grads: bool = False,
    conv_decoder: str = "activation_below", feedback_per_decoder: str = "",
) -> Rule:
    """Difference target propagation (Lee et al. 2015): tau_{l-1} = h_{l-1} + g_l(tau_l) - g_l(h_l).
    The first target is Lee et al.'s Algorithm 1 (`penultimate`); `output` sets it on the logits
    and carries it down through an output decoder (3 seeds on Fashion-MNIST: 0.5 points worse)."""
    return _build(Settings(beta, space, feedback_lr, feedback_iters, feedback_noise, feedback_objective,
                           feedback_normalise, output_init="difference", first_target=first_target,
                           decoder_order=decoder_order, per_block_grads=per_block_grads, conv_decoder=conv_decoder,
                           feedback_per_decoder=feedback_per_decoder))


def l_drl(
    beta: float = 0.5, space: str = "post", feedback_lr: float = 0.05, feedback_iters: int = 1,
    feedback_noise: float = 0.1, first_target: str = "output", decoder_order: str = "before",
    per_block_grads: bool = False, conv_decoder: str = "reversed_block", feedback_per_decoder: str = "",
) -> Rule:
    """DTP whose decoders learn backprop's targets with the local difference reconstruction loss
    (Ernoult et al. 2022)."""
    return _build(Settings(beta, space, feedback_lr, feedback_iters, feedback_noise, "ldrl", False,
                           output_init="difference", first_target=first_target, decoder_order=decoder_order,
                           per_block_grads=per_block_grads, conv_decoder=conv_decoder,
                           feedback_per_decoder=feedback_per_decoder))


def iterative_dtp(
    beta: float = 0.5, space: str = "post", feedback_lr: float = 1.0, feedback_iters: int = 1,
    feedback_noise: float = 0.3, feedback_objective: str = "autoencoder", feedback_normalise: bool = True,
    input_iters: int = 1, output_iters: int = 2, output_init: str = "difference", dtp1: bool = False,
    dtp1_output: bool = False, influence_scaling: str = "batch", per_block_grads: bool = False,
    conv_decoder: str = "activation_below", feedback_per_decoder: str = "",
) -> Rule:
    """Differential target propagation with iterated approximate inverses (Bengio 2020)."""
    return _build(Settings(beta, space, feedback_lr, feedback_iters, feedback_noise, feedback_objective,
                           feedback_normalise, input_iters, output_iters, output_init, dtp1, dtp1_output,
                           influence_scaling, per_block_grads=per_block_grads, conv_decoder=conv_decoder,
                           feedback_per_decoder=feedback_per_decoder))


@hookimpl
def register_rules(register):
    for name, build, summary in (
        ("target_prop", target_prop, "target propagation through learned layer inverses (Bengio 2014)"),
        ("dtp", dtp, "difference target propagation (Lee et al. 2015)"),
        ("iterative_dtp", iterative_dtp, "DTP with iterated inverses, DTP1 update, influence scaling (Bengio 2020)"),
        ("l_drl", l_drl, "DTP with decoders trained by the local difference reconstruction loss (Ernoult et al. 2022)"),
    ):
        options = {k: p.default for k, p in inspect.signature(build).parameters.items()}
        register(RuleSpec(name, build, summary, options=options, models=MODELS,
                          ranges={k: v for k, v in RANGES.items() if k in options},
                          model_defaults=MODEL_DEFAULTS))
