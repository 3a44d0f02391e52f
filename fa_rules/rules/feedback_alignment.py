"""The feedback-alignment family: backprop's error signal sent back through tensors other than the
forward weights.

Notation (three-block MLP, as in the notes on feedback alignment): `a_l = W_l h_{l-1} + b_l`,
`h_l = f(a_l)`, logits `a_y = W_3 h_2 + b_3`, cross-entropy `J`, output error `e = dJ/da_y`.
Every rule updates `W_l` by `delta_a_l h_{l-1}^T` and differs only in `delta_a_l`:

- backprop:   `delta_a_2 = (W_3^T e) * f'(a_2)`,       `delta_a_1 = (W_2^T delta_a_2) * f'(a_1)`
- `feedback_alignment` (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic feedback
  weights support error backpropagation for deep learning", Nat. Commun. 7:13276):
  `delta_a_2 = (B_3^T e) * f'(a_2)`, `delta_a_1 = (B_2^T delta_a_2) * f'(a_1)`, `B` fixed random.
- `direct_feedback_alignment` / `dfa` (Nøkland 2016, "Direct feedback alignment provides learning
  in deep neural networks", NeurIPS): `delta_a_l = (D_l e) * f'(a_l)` for every hidden block.
- `indirect_feedback_alignment` / `ifa` (Nøkland 2016, same paper): `delta_a_1 = (D_1 e) * f'(a_1)`,
  then forward through the forward weights: `delta_a_2 = (W_2 delta_a_1) * f'(a_2)`, and so on.
- `sign_symmetry` (Liao, Leibo & Poggio 2016, "How important is weight symmetry in
  backpropagation?", AAAI): feedback alignment with `B_l = scale * mean|W_l| * sign(W_l)`,
  recomputed from the current weights every step (the paper's uSF, `B_l = sign(W_l)`, is
  `magnitude=unit`: see below).
- `kolen_pollack` (Kolen & Pollack 1994, "Backpropagation without weight transport"; Akrout,
  Wilson, Humphreys, Lillicrap & Tweed 2019, "Deep learning without weight transport", NeurIPS):
  feedback alignment with learned `B_l`. `W_l` and `B_l` receive the same update plus weight decay,
  `dW_l = delta_a_l h_{l-1}^T + decay W_l`, `dB_l = delta_a_l h_{l-1}^T + decay B_l`, so
  `W_l - B_l` shrinks by `(1 - lr decay)` per plain SGD step and the feedback comes to align with
  the forward weights. `B` is the parameter group `feedback`, which the engine optimises. The
  step returns `delta_a_l h_{l-1}^T` for both and declares the decay terms (`Rule.weight_decay`),
  which the engine adds inside its Adam kernel: the same pseudo-gradients, two passes fewer.

- `brsf` and `frsf` (Moskovitz, Litwin-Kumar & Abbott 2018, "Feedback alignment in deep
  convolutional networks", arXiv:1812.06488): sign-concordant feedback `B_l = |R_l| * sign(W_l)`,
  the forward weights' signs with random magnitudes `|R_l|` (`R_l` drawn as FA's feedback). brSF
  ("batchwise random magnitude") draws `R_l` anew for every batch, from the step's generator;
  frSF ("fixed random magnitude") draws it once. The signs follow `W_l` every step.
- `direct_random_target_projection` / `drtp` (Frenkel, Lefebvre & Bol 2021, "Learning without
  feedback: fixed random learning signals allow for feedforward training of deep neural
  networks", Front. Neurosci. 15:629892, Eq. 6-7): DFA with the one-hot target `y*` in place of
  the error, `delta_a_l = (D_l y*) * f'(a_l)`, the sign the authors' reference code uses (the
  update descends `delta_a_l h_{l-1}^T`). The target is known before the forward pass, so each
  hidden block is updated as soon as it has run: no backward pass, and no graph spans two blocks
  (`fa_rules.core.feedback.target_projection_gradients`). As in the authors' code, a hidden
  block's update is a sum over the batch (`D_l y*` per example), while the output block's is the
  batch mean of the cross-entropy's gradient, as in DFA.

Sign symmetry's magnitude: ours (`magnitude=mean_abs`, the default) is `scale * mean|W_l|`,
recomputed from the current weights every step, so the feedback keeps the forward weights' scale;
the paper's uSF (`magnitude=unit`) is `B_l = scale * sign(W_l)`, whose signal grows by about
`1 / mean|W|` per block (the paper pairs it with batch norm or its sign-of-update "Batch Manhattan"
rule; Adam's per-parameter scaling absorbs it, SGD does not); BioTorch's `usf`
(`magnitude=xavier`) is the constant `scale * sqrt(2 / (fan_in + fan_out))`, the standard deviation
of Xavier's init, fixed by the shape.

DFA's `targets` says where the projected error lands. `blocks` (the default): at each hidden block's
output, as described below. `layers`: Nøkland's DFA per layer, which is BioTorch's `dfa` mode; every
Linear and convolution (each weight of `feedback_weight_keys`) sends down, in place of `W^T g`, the
error projected to its input by a fixed random `D` of its own, shaped as BioTorch shapes it
(`(classes, in_features)`; `(classes, in_channels, *kernel)`, the error copied over the layer's output
positions and sent back by the transposed convolution), and its weight gets its true gradient for
what reaches its output; batch norm, activations, pooling and skip paths pass the signal on as in
backprop (`fa_rules.core.feedback.layer_direct_feedback_gradients`). On `Linear -> activation`
blocks the two agree; on a residual network (torchvision's resnet18: 7 blocks, 21 layers) they do
not, and `layers` equals BioTorch's update (`tests/test_biotorch_parity.py`).

DFA's `projection=conv` is BioTorch's structured feedback for conv blocks: where the next block's
layer is a Conv2d, `D_l` is a kernel (classes, channels, kh, kw) and block `l`'s output receives the
error broadcast over the next layer's output positions, sent back by the transposed convolution
with the next layer's stride and padding (so the signal is the same at every interior position and
differs only near the borders). Other hidden blocks keep the dense `D_l` (`projection=dense`,
shape (block output numel, classes)).

Here `B_l` has the shape of `W_l` (so `B_l^T` stands where backprop has `W_l^T`; the notes write
its transpose), and for a convolution `B_l^T` is the transposed convolution with `B_l`: the
mechanism is one `vjp` per block with the feedback tensor substituted for the weight
(`fa_rules.core.feedback`), so Linear and Conv2d blocks, pooling included, are handled alike.

The output block (the last, whose output are the logits) is always trained with its true local
gradient `e h_{L-1}^T` (as in all the papers above); the rules differ only in the hidden blocks.

Direct and indirect FA project `e` to the *output* of a hidden block with a matrix `D_l` of shape
(block output numel, classes); for an MLP block that output is `h_l = f(a_l)`, which gives the
formulas above, and for a conv block `conv -> relu -> maxpool` the projected signal lands on the
pooled map and reaches `a_l` through the pooling and activation derivatives. In IFA the signal then
travels forward as the activations do (through the next layer with its weight and no bias, the
activation derivative, and the pooling's selection); `post` parameters (batch norm) are not trained
by IFA.

Settings (`--opt key=value`): `init` (uniform: the forward weights' default distribution
U(+-1/sqrt(fan_in)); gaussian; xavier), `scale` (multiplies the feedback), `feedback_seed` (-1: draw
from the run's seeded generator; otherwise a generator of its own with this seed, so the same
seed gives the same feedback whatever the run seed), `decay` (Kolen-Pollack), `magnitude` (sign
symmetry), `projection` (DFA, DRTP: dense or conv), `targets` (DFA: blocks or layers),
`exact_gradient` (FA, sign symmetry, Kolen-Pollack, brSF, frSF; see below).

FA, sign symmetry, Kolen-Pollack, brSF and frSF give a feedback tensor to every parameter the
forward pass uses as the weight of a linear map or convolution, raw parameters called through
`F.linear` / `F.conv2d` included (`fa_rules.core.feedback.reached_weight_keys`), and refuse in one
line a parameter used any other way (`x @ W`, an embedding), which no feedback tensor can stand in
for, rather than train it silently by its exact gradient; `exact_gradient`, comma-separated fnmatch
patterns over model keys (`blocks.0.W,blocks.3.*`), accepts that for the parameters it names (a
pattern naming none is refused too). `Rule.credit` lists the model keys trained with feedback and
the others (the first layer, biases, normalisations, the parameters opted in).

The learned-feedback rules of the family (bidirectional FA and DFA, the weight mirror) are in
`fa_rules.rules.learned_feedback`.
"""

from __future__ import annotations

import math

import torch

from fa_rules.core import Rule, RuleSpec, hookimpl
from fa_rules.core.config import MAX_SEED
from fa_rules.core.errors import UserError
from fa_rules.core.feedback import (
    FEEDBACK_INITS,
    block_output_shapes,
    chained_feedback_gradients,
    check_feedback_network,
    conv_projection_shape,
    credit_listing,
    direct_feedback_gradients,
    draw_feedback,
    feedback_weight_keys,
    indirect_feedback_gradients,
    layer_direct_feedback_gradients,
    layer_projection_shapes,
    reached_weight_keys,
    target_projection_gradients,
    xavier_std,
)
from fa_rules.core.rule import NON_NEGATIVE, Range

RANDOM_OPTIONS = {"init": "uniform", "scale": 1.0, "feedback_seed": -1}
# their declared ranges (checked by the registered specs, `RuleSpec.check_options`); a scale of 0
# leaves only the output block learning, the random-features floor
RANDOM_RANGES = {"init": FEEDBACK_INITS, "scale": NON_NEGATIVE,
                 "feedback_seed": Range(-1, MAX_SEED, note="-1: drawn from the run's seed")}
# the layer-level rules' opt-in for parameters their feedback cannot reach (`reached_weight_keys`):
# comma-separated fnmatch patterns over model keys, any string, so no declared range
EXACT = {"exact_gradient": ""}


def _generator(generator: torch.Generator, feedback_seed: int) -> torch.Generator:
    return generator if feedback_seed < 0 else torch.Generator().manual_seed(feedback_seed)


def _random_weight_feedback(model, keys, generator, init, scale, feedback_seed) -> dict:
    """One random tensor shaped like each weight of `keys` (those that send the error backwards,
    `reached_weight_keys`), drawn in their order."""
    gen = _generator(generator, feedback_seed)
    return {k: draw_feedback(model[k].shape, init, scale, gen, like=model[k]) for k in keys}


PROJECTIONS = ("dense", "conv")


def _random_projections(network, model, blocks, generator, init, scale, feedback_seed,
                        projection: str = "dense") -> dict:
    """`D_l` of shape (numel of block l's output, classes) for each block index in `blocks`; with
    `projection="conv"`, a kernel (classes, channels, *kernel) where the next layer is a Conv2d."""
    if projection not in PROJECTIONS:
        raise UserError(f"unknown projection '{projection}' (use {' or '.join(PROJECTIONS)})")
    gen = _generator(generator, feedback_seed)
    shapes = block_output_shapes(network, model)
    classes = shapes[-1][0]
    like = next(iter(model.values()))
    out = {}
    for i in blocks:
        kernel = conv_projection_shape(network, i, classes) if projection == "conv" else None
        shape = kernel if kernel is not None else (math.prod(shapes[i]), classes)
        out[f"blocks.{i}"] = draw_feedback(shape, init, scale, gen, like=like)
    return out


def _ordered(model: dict, grads: dict) -> dict:
    return {k: grads[k] for k in model}


# -- feedback alignment ------------------------------------------------------------------------------
def feedback_alignment(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1,
                       exact_gradient: str = "") -> Rule:
    """Fixed random feedback tensors, one per weight that sends the error backwards."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "feedback_alignment")
        keys = reached_weight_keys(network, params["model"], "feedback_alignment", exact_gradient)
        return params, {"feedback": _random_weight_feedback(params["model"], keys, generator, init, scale,
                                                            feedback_seed)}

    def step(network, params, state, batch):
        model = params["model"]
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, state["feedback"])
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    def credit(network, params, state):
        return credit_listing(network, state["feedback"])

    return Rule(init=init_fn, step=step, task="classify", credit=credit)


# -- direct feedback alignment -----------------------------------------------------------------------
def _projection_rule(name: str, gradients, init: str, scale: float, feedback_seed: int, projection: str) -> Rule:
    """A rule whose hidden blocks receive a fixed random projection (matrix or conv kernel, one per
    hidden block, in `state`) of a signal that `gradients` computes: DFA's error, DRTP's target."""

    def init_fn(network, params, generator):
        check_feedback_network(network, name)
        network.require_blocks(name, "hidden blocks to project to")  # with one block it would be backprop
        hidden = range(network.num_blocks - 1)
        return params, {"projections": _random_projections(network, params["model"], hidden, generator, init,
                                                           scale, feedback_seed, projection)}

    def step(network, params, state, batch):
        model = params["model"]
        projections = {int(k.split(".")[1]): d for k, d in state["projections"].items()}
        grads, loss = gradients(network, model, batch.x, batch.y, projections)
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    return Rule(init=init_fn, step=step, task="classify")


TARGETS = ("blocks", "layers")


def _layer_projection_rule(init: str, scale: float, feedback_seed: int, projection: str) -> Rule:
    """DFA at every linear map and convolution (`targets=layers`): one fixed random projection per
    weight that `feedback_weight_keys` lists, in `state["projections"]` under that weight's key."""
    name = "direct_feedback_alignment"

    def init_fn(network, params, generator):
        check_feedback_network(network, name)
        if projection != "dense":
            raise UserError(f"rule '{name}': projection={projection} shapes block projections; with "
                            "targets=layers each layer's projection is shaped by the layer (leave projection=dense)")
        model = params["model"]
        classes = block_output_shapes(network, model)[-1][0]
        shapes = layer_projection_shapes(network, model, feedback_weight_keys(network, model), classes)
        gen = _generator(generator, feedback_seed)
        return params, {"projections": {k: draw_feedback(shape, init, scale, gen, like=model[k])
                                        for k, shape in shapes.items()}}

    def step(network, params, state, batch):
        model = params["model"]
        grads, loss = layer_direct_feedback_gradients(network, model, batch.x, batch.y, state["projections"])
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    return Rule(init=init_fn, step=step, task="classify")


def direct_feedback_alignment(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1,
                              projection: str = "dense", targets: str = "blocks") -> Rule:
    """The output error projected by a fixed random matrix (or conv kernel) straight to every
    hidden block (`targets=blocks`) or to the input of every linear map and convolution
    (`targets=layers`, BioTorch's dfa)."""
    if targets == "layers":
        return _layer_projection_rule(init, scale, feedback_seed, projection)
    if targets != "blocks":
        raise UserError(f"unknown DFA targets '{targets}' (use {' or '.join(TARGETS)})")
    return _projection_rule("direct_feedback_alignment", direct_feedback_gradients, init, scale, feedback_seed,
                            projection)


# -- indirect feedback alignment ---------------------------------------------------------------------
def indirect_feedback_alignment(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1) -> Rule:
    """The output error projected to the first hidden block, then sent forward through the forward
    weights to the later hidden blocks."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "indirect_feedback_alignment", needs_layers="to send the error forward through")
        first = range(min(1, network.num_blocks - 1))
        return params, {"projections": _random_projections(network, params["model"], first, generator, init,
                                                           scale, feedback_seed)}

    def step(network, params, state, batch):
        model = params["model"]
        projection = state["projections"].get("blocks.0")
        grads, loss = indirect_feedback_gradients(network, model, batch.x, batch.y, projection)
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    return Rule(init=init_fn, step=step, task="classify")


# -- sign symmetry -----------------------------------------------------------------------------------
MAGNITUDES = ("mean_abs", "unit", "xavier")


def sign_feedback(weight: torch.Tensor, scale: float, magnitude: str = "mean_abs") -> torch.Tensor:
    """The forward weights' signs at one magnitude: `scale * mean|W|` (ours, recomputed from the
    weights), `scale` (Liao et al.'s uSF) or `scale * sqrt(2 / (fan_in + fan_out))` (BioTorch's
    usf, fixed by the shape)."""
    if magnitude == "mean_abs":
        signs = torch.sign(weight)
        # mean|W| = <sign(W), W> / n: one BLAS dot instead of an |W| tensor and its mean; both
        # scalings in place (each op is a visible cost on a small step)
        scaled_mean_abs = torch.dot(signs.reshape(-1), weight.reshape(-1)).mul_(scale / weight.numel())
        return signs.mul_(scaled_mean_abs)
    if magnitude == "unit":
        # one pass over W: each pass over the routed weights is ~2% of a small MLP's step
        return torch.sign(weight) if scale == 1.0 else torch.sign(weight).mul_(scale)
    if magnitude == "xavier":
        return torch.sign(weight) * (scale * xavier_std(weight.shape))
    raise UserError(f"unknown sign-symmetry magnitude '{magnitude}' (use {', '.join(MAGNITUDES)})")


def sign_symmetry(scale: float = 1.0, magnitude: str = "mean_abs", exact_gradient: str = "") -> Rule:
    """Feedback tensors that share the forward weights' signs, recomputed every step."""

    def keys(network, model):
        return reached_weight_keys(network, model, "sign_symmetry", exact_gradient)  # (cached after init)

    def init_fn(network, params, generator):
        check_feedback_network(network, "sign_symmetry")
        sign_feedback(next(iter(params["model"].values())), scale, magnitude)  # an unknown magnitude fails here
        keys(network, params["model"])
        return params, {}

    def step(network, params, state, batch):
        model = params["model"]
        feedback = {k: sign_feedback(model[k], scale, magnitude) for k in keys(network, model)}
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, feedback)
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    def credit(network, params, state):
        return credit_listing(network, keys(network, params["model"]))

    return Rule(init=init_fn, step=step, task="classify", credit=credit)


# -- sign-concordant feedback with random magnitudes ------------------------------------------------
def random_magnitude_sign_feedback(frsf: bool, init: str = "uniform", scale: float = 1.0,
                                   feedback_seed: int = -1, exact_gradient: str = "") -> Rule:
    """`B_l = |R_l| * sign(W_l)`; `R_l` fixed (frSF) or drawn anew every batch (brSF)."""
    name = "frsf" if frsf else "brsf"

    def keys(network, model):
        return reached_weight_keys(network, model, name, exact_gradient)  # (cached after init)

    def init_fn(network, params, generator):
        check_feedback_network(network, name)
        model = params["model"]
        if not frsf:
            _random_weight_feedback(model, keys(network, model), generator, init, scale, 0)  # checks `init`
            return params, {}
        magnitudes = _random_weight_feedback(model, keys(network, model), generator, init, scale, feedback_seed)
        return params, {"magnitudes": {k: m.abs() for k, m in magnitudes.items()}}

    def step(network, params, state, batch):
        model = params["model"]
        if frsf:
            magnitudes = state["magnitudes"]
        else:
            magnitudes = {k: m.abs() for k, m in _random_weight_feedback(model, keys(network, model),
                                                                         batch.generator(), init, scale, -1).items()}
        feedback = {k: m * torch.sign(model[k]) for k, m in magnitudes.items()}
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, feedback)
        return {"model": _ordered(model, grads)}, state, {"loss": loss}

    def credit(network, params, state):
        return credit_listing(network, state["magnitudes"] if frsf else keys(network, params["model"]))

    return Rule(init=init_fn, step=step, task="classify", credit=credit)


def brsf(init: str = "uniform", scale: float = 1.0, exact_gradient: str = "") -> Rule:
    """Sign-concordant feedback with batchwise random magnitudes."""
    return random_magnitude_sign_feedback(False, init, scale, exact_gradient=exact_gradient)


def frsf(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1, exact_gradient: str = "") -> Rule:
    """Sign-concordant feedback with fixed random magnitudes."""
    return random_magnitude_sign_feedback(True, init, scale, feedback_seed, exact_gradient)


# -- direct random target projection ---------------------------------------------------------------
def direct_random_target_projection(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1,
                                    projection: str = "dense") -> Rule:
    """The one-hot target projected by a fixed random matrix to every hidden block; no backward pass."""
    return _projection_rule("direct_random_target_projection", target_projection_gradients, init, scale,
                            feedback_seed, projection)


# -- Kolen-Pollack -----------------------------------------------------------------------------------
def kolen_pollack(init: str = "uniform", scale: float = 1.0, feedback_seed: int = -1, decay: float = 1e-3,
                  exact_gradient: str = "") -> Rule:
    """Learned feedback: forward and feedback weights get the same update plus weight decay (>= 0: a
    negative decay would push W and B apart, not together)."""

    def init_fn(network, params, generator):
        check_feedback_network(network, "kolen_pollack")
        keys = reached_weight_keys(network, params["model"], "kolen_pollack", exact_gradient)
        feedback = _random_weight_feedback(params["model"], keys, generator, init, scale, feedback_seed)
        return {**params, "feedback": feedback}, {}

    def step(network, params, state, batch):
        model, feedback = params["model"], params["feedback"]
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, feedback)
        # W and B share the one tensor `delta h^T`; their decay terms are declared below
        return {"model": _ordered(model, grads), "feedback": {k: grads[k] for k in feedback}}, state, {"loss": loss}

    def weight_decay(network, params):
        # `decay W` and `decay B`, added by the engine (in the Adam kernel, which reads W and B anyway)
        keys = params["feedback"]
        return {"model": {k: decay for k in keys}, "feedback": {k: decay for k in keys}}

    def credit(network, params, state):
        return credit_listing(network, params["feedback"])

    return Rule(init=init_fn, step=step, task="classify", weight_decay=weight_decay, credit=credit)


@hookimpl
def register_rules(register):
    projected = {**RANDOM_RANGES, "projection": PROJECTIONS}
    register(RuleSpec("feedback_alignment", feedback_alignment,
                      "fixed random feedback weights (Lillicrap et al. 2016)", options={**RANDOM_OPTIONS, **EXACT},
                      ranges=RANDOM_RANGES))
    register(RuleSpec("direct_feedback_alignment", direct_feedback_alignment,
                      "output error projected to every hidden block (Nøkland 2016)",
                      options={**RANDOM_OPTIONS, "projection": "dense", "targets": "blocks"},
                      ranges={**projected, "targets": TARGETS}, aliases=("dfa",)))
    register(RuleSpec("indirect_feedback_alignment", indirect_feedback_alignment,
                      "error projected to the first hidden block, then sent forward (Nøkland 2016)",
                      options=dict(RANDOM_OPTIONS), ranges=RANDOM_RANGES, aliases=("ifa",)))
    register(RuleSpec("sign_symmetry", sign_symmetry,
                      "feedback = sign of the forward weights (Liao, Leibo & Poggio 2016)",
                      options={"scale": 1.0, "magnitude": "mean_abs", **EXACT},
                      ranges={"scale": NON_NEGATIVE, "magnitude": MAGNITUDES}))
    register(RuleSpec("brsf", brsf, "feedback = sign of the forward weights, random magnitudes drawn every batch "
                      "(Moskovitz et al. 2018)", options={"init": "uniform", "scale": 1.0, **EXACT},
                      ranges={"init": FEEDBACK_INITS, "scale": NON_NEGATIVE}))
    register(RuleSpec("frsf", frsf, "feedback = sign of the forward weights, fixed random magnitudes "
                      "(Moskovitz et al. 2018)", options={**RANDOM_OPTIONS, **EXACT}, ranges=RANDOM_RANGES))
    register(RuleSpec("direct_random_target_projection", direct_random_target_projection,
                      "one-hot target projected to every hidden block, no backward pass (Frenkel et al. 2021)",
                      options={**RANDOM_OPTIONS, "projection": "dense"}, ranges=projected, aliases=("drtp",)))
    register(RuleSpec("kolen_pollack", kolen_pollack,
                      "learned feedback, same update as the forward weights plus decay (Akrout et al. 2019)",
                      options={**RANDOM_OPTIONS, "decay": 1e-3, **EXACT},
                      ranges={**RANDOM_RANGES, "decay": NON_NEGATIVE}))
