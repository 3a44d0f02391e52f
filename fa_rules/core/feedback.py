"""Sending an error signal through blocks with substitute feedback tensors.

The one mechanism behind the feedback-alignment family. Backprop sends the error at block `i`'s
output back to its input through the transpose of the block's own weight. Here the layer's
*forward value* uses the weight `W` but its derivative with respect to its input uses a feedback
tensor `B` of the same shape, while `W` and the bias keep their true gradients (`delta_a x^T`
with `delta_a` the signal at the layer's output, evaluated at the true pre-activation):

    a = layer(x; W, b)        value as usual
    d a / d x                 the layer map with B: `B^T delta_a` for a Linear layer, the
                              transposed convolution with `B` for a convolution

`feedback_call` runs a module so (by saved-tensor hooks, autograd Functions or a function mode;
its docstring says which where). Its meaning is the additive form, `layer(stop(x); W, b) +
layer(x - stop(x); B, 0)` with `stop` a constant: value `layer(x; W, b)`, derivative through `B`.
Pooling, activations or any other parameter-free `post` are differentiated as usual. With `B = W`
this is backprop.

Five ways of routing the output error `e = dL/d(logits)` are built on it:

- `chained_feedback_gradients`: block by block from the output down, each block's input signal
  through its feedback tensor (feedback alignment, sign symmetry, Kolen-Pollack);
- `direct_feedback_gradients`: every hidden block receives `e` projected by a matrix straight to
  its output (direct feedback alignment);
- `indirect_feedback_gradients`: the first hidden block receives the projected error, which then
  travels forward through the forward weights to the later hidden blocks (indirect feedback
  alignment);
- `layer_direct_feedback_gradients`: every linear map and convolution sends down `e` projected
  to its input by its own matrix in place of `W^T g` (direct feedback alignment per layer, as
  BioTorch's `dfa` mode computes it);
- `target_projection_gradients`: every hidden block receives the one-hot *target* projected to
  its output, block by block as the forward pass reaches it, so no block's graph outlives the
  block (direct random target projection).

In all five the output block receives its true local gradient `e h^T`. A direct projection is
either a dense matrix (block output numel, classes) or, for a block whose next layer is a Conv2d,
a convolution kernel (classes, block channels, *next kernel*): the error broadcast over the next
layer's output positions is sent back through a transposed convolution with the next layer's
geometry (BioTorch's structured DFA feedback, `conv_projection_shape`).

On a network of plain blocks (`_closed_form_chain_fits`: a Linear or zero-padded convolution, an
elementwise activation with a closed-form derivative, then nothing or max pooling) and where
`closed_form_allowed` (a step under plain autograd, outside any `grad` or `vjp` and the memory
probe), the chained, direct, indirect and target routings run as hand-written loops: a forward
pass without a graph, then each block's transpose and true gradients in closed form
(`_closed_form_block_backward`). Same arithmetic, without autograd's bookkeeping; every loop is
tested against its graph route.

Which weights a layer-level rule (FA, sign symmetry, Kolen-Pollack, brSF, frSF) gives feedback
tensors: `parameter_uses` runs the network once on zeros under a function mode and records what
each parameter is used as (a linear map's or convolution's weight or bias, a normalisation's
affine parameter, anything else), so raw `nn.Parameter`s called through `F.linear` / `F.conv2d`
count like nn.Linear and nn.Conv modules. `feedback_weight_keys` is every such weight but a
layered first block's layer. A parameter used any other way (`x @ W`, an embedding, `W.T`) is out
of the feedback's reach, and training it silently by its exact gradient would pass for feedback
alignment: `reached_weight_keys` refuses it in one line unless the rule option `exact_gradient`
(fnmatch patterns over model keys) names it, and refuses a network left with no feedback weight.
Biases and normalisation parameters train by their exact gradient by design (no signal goes
through them); `credit_listing` says which keys are trained which way (`Rule.credit`).

For learned feedback: `reverse_feedback_gradients` runs the network backwards from the target
with the feedback tensors (the bidirectional FA reverse pass) and `mirror_gradients` correlates
noise sent through each layer with the layer's response (the weight mirror). Layers must be affine in
their input with `weight` as the only multiplicative parameter (Linear, Conv, ConvTranspose);
`check_feedback_network` says so clearly for anything else. `draw_feedback` draws random feedback
tensors from an explicit generator.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import weakref
from typing import Callable, Mapping

import torch
import torch.func
from torch.autograd import forward_ad
from torch import nn
from torch.utils._pytree import tree_leaves

from fa_rules.core.autodiff import (closed_form_allowed, first_order, grad_and_value, load_forward_ad,
                                   plain_autograd, vjp)
from fa_rules.core.errors import UserError
from fa_rules.core.metrics import classification_loss
from fa_rules.core.network import Block, Network, Params, call_with, max_pool_with_indices, parameter_slots

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
FEEDBACK_INITS = ("uniform", "gaussian", "xavier")

Pullback = Callable[[torch.Tensor], "tuple[Params, torch.Tensor | None]"]


# -- checks and random feedback -------------------------------------------------------------------
def check_feedback_network(network: Network, rule: str, needs_layers: str | None = None) -> None:
    """A clear error for networks the feedback mechanism cannot run on; with `needs_layers` (what
    for), for rules that also need every block in the `layer -> activation -> post` form."""
    if len(network.heads):
        raise UserError(f"rule '{rule}' trains a classifier whose last block is the output; "
                        f"this network has heads ({', '.join(network.heads)})")
    if needs_layers:
        network.require_layered(f"one layer per block {needs_layers}", rule)
    for i, block in enumerate(network.blocks):
        if isinstance(block, Block) and not isinstance(block.layer, AFFINE_LAYERS):
            raise UserError(f"rule '{rule}' needs Linear or convolution layers; block {i} has "
                            f"{type(block.layer).__name__}")


def weight_key(i: int) -> str:
    """Global key of block i's layer weight (the tensor a feedback tensor stands in for)."""
    return f"blocks.{i}.layer.weight"


def feedback_weight_keys(network: Network, params: Params | None = None) -> list[str]:
    """Global keys of the weights whose layers send the error backwards, in `named_parameters`
    order: every parameter that the forward pass uses as the weight of a linear map or convolution
    (`parameter_uses`), except the layer of a layered first block (it reads the input, where no
    signal is needed). `params`: the model's parameters (default the module's own); only their keys,
    dtype and device matter, and the answer is cached per network."""
    uses = parameter_uses(network, dict(network.named_parameters()) if params is None else params)
    first_layer = weight_key(0) if isinstance(network.blocks[0], Block) else None
    return [k for k, use in uses.items() if "weight" in use and k != first_layer]


# -- what each parameter is used for: where layer-level feedback reaches ----------------------------
_NORMALISATIONS = tuple(f for f in (torch.nn.functional.batch_norm, torch.nn.functional.layer_norm,
                                    torch.nn.functional.group_norm, torch.nn.functional.instance_norm,
                                    getattr(torch.nn.functional, "rms_norm", None), torch.native_batch_norm)
                       if f is not None)
# reading a tensor's metadata sends no gradient anywhere: not a use
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "is_cuda", "size",
                       "dim", "ndimension", "numel", "nelement", "stride", "element_size", "is_contiguous",
                       "is_floating_point", "is_complex", "get_device"})


def _function_name(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # an attribute read (`W.T`): named by the attribute
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _call_uses(func, args: tuple, kwargs: dict):
    """`(tensor, use)` for the arguments of one torch function call (see `parameter_uses`)."""
    name = _function_name(func)
    if name in _METADATA:
        return []
    if func in _ROUTABLE or func in _NORMALISATIONS:
        x = _arg(args, kwargs, 0, "input")
        if func in _NORMALISATIONS:
            rest = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]
            roles = [(t, "norm") for t in tree_leaves(rest)]
        else:
            roles = [(_arg(args, kwargs, 1, "weight"), "weight"), (_arg(args, kwargs, 2, "bias"), "bias")]
        return [(x, f"other:{name}"), *roles]
    return [(t, f"other:{name}") for t in tree_leaves((args, kwargs))]


class _UseRecorder(torch.overrides.TorchFunctionMode):
    """Records, per parameter (by identity), what each outermost torch function call uses it as."""

    def __init__(self, keys_of: dict[int, str]):
        super().__init__()
        self.keys_of = keys_of
        self.uses: dict[str, list[str]] = {k: [] for k in keys_of.values()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor, use in _call_uses(func, args, kwargs):
            key = self.keys_of.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if key is not None and use not in self.uses[key]:
                self.uses[key].append(use)
        return func(*args, **kwargs)


# network -> {parameter keys: {key: uses}}
_USES: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def parameter_uses(network: Network, params: Params) -> dict[str, tuple[str, ...]]:
    """`{key: uses}` for every model parameter, in `named_parameters` order, from one forward pass
    on zeros (batch 2, no graph, the module in its current mode): "weight" or "bias" of a linear map
    or convolution (the calls `feedback_call` routes), "norm" (weight or bias of a normalisation),
    "other:<function>" for anything else (`x @ W`, an embedding); an unused parameter has none.
    Only outermost calls count (a module's forward calling `F.linear` is a linear map). Cached per
    network and set of keys: the uses depend on the code, not on the values."""
    known = _USES.setdefault(network, {})
    keys = frozenset(params)
    if keys not in known:
        if not network.in_shape:
            raise UserError("finding which parameters layer-level feedback reaches runs the network once: build it "
                            "with its input shape (Network(..., in_shape=...))")
        recorder = _UseRecorder({id(v): k for k, v in params.items()})
        like = next(iter(params.values()))
        with torch.no_grad():
            zeros = torch.zeros(2, *network.in_shape, device=like.device, dtype=like.dtype)
            with recorder:
                network.apply(params, zeros)
        order = [k for k, _ in network.named_parameters() if k in keys]
        known[keys] = {k: tuple(recorder.uses[k]) for k in order}
    return known[keys]


def _unreachable(uses: Mapping[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """`{key: functions}` of the parameters with a use no feedback tensor can stand in for."""
    found = {k: [u.removeprefix("other:") for u in use if u.startswith("other:")] for k, use in uses.items()}
    return {k: functions for k, functions in found.items() if functions}


def exact_gradient_patterns(exact_gradient: str) -> list[str]:
    """The rule option `exact_gradient`: comma-separated fnmatch patterns over model keys."""
    return [p.strip() for p in exact_gradient.split(",") if p.strip()]


# network -> {(parameter keys, exact_gradient): the keys reached}
_REACHED: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def reached_weight_keys(network: Network, params: Params, rule: str, exact_gradient: str = "") -> list[str]:
    """The weights a layer-level feedback rule gives feedback tensors: `feedback_weight_keys` less
    those the user opted into their exact gradient. Refuses, in one line, a parameter that the
    feedback cannot reach (used other than as a linear map's or convolution's weight, bias or a
    normalisation's affine parameter) unless a pattern of `exact_gradient` names it; a pattern
    that names none of those (a typo must not pass silently); and a network left with no feedback
    weight at all (the rule would be backprop). Worked out once per network, keys and option."""
    known = _REACHED.setdefault(network, {})
    cache_key = (frozenset(params), exact_gradient)
    if cache_key in known:
        return known[cache_key]
    unreachable = _unreachable(parameter_uses(network, params))
    patterns = exact_gradient_patterns(exact_gradient)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in unreachable):
            those = f"those are {', '.join(unreachable)}" if unreachable else "this network has none"
            raise UserError(f"rule '{rule}': exact_gradient pattern '{pattern}' names no parameter that the "
                            f"feedback cannot reach ({those})")
    accepted = {k for k in unreachable if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    refused = [k for k in unreachable if k not in accepted]
    if refused:
        k = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"rule '{rule}' cannot send feedback through parameter '{k}'{more}: it is used in "
                        f"{', '.join(unreachable[k])}, not as the weight of a linear map or convolution; to train "
                        f"it by its exact gradient, opt in with the rule option exact_gradient={','.join(refused)}")
    keys = [k for k in feedback_weight_keys(network, params) if k not in accepted]
    if not keys:
        raise UserError(f"rule '{rule}' reaches no layer of this network: no weight of a linear map or convolution "
                        "past the first layer sends the error backwards, so it would train by backprop's exact "
                        "gradient; give a model with more layers or another rule")
    known[cache_key] = keys
    return keys


def credit_listing(network: Network, feedback_keys) -> dict[str, list[str]]:
    """`Rule.credit`'s listing: the model keys trained with substituted feedback, and the others
    (the first layer, biases, normalisations, parameters opted into `exact_gradient`), each in
    `named_parameters` order."""
    fed = set(feedback_keys)
    keys = [k for k, _ in network.named_parameters()]
    return {"feedback": [k for k in keys if k in fed], "exact_gradient": [k for k in keys if k not in fed]}


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def draw_feedback(shape, init: str, scale: float, generator: torch.Generator,
                  like: torch.Tensor | None = None) -> torch.Tensor:
    """A random tensor of `shape` laid out like a weight `(out, in, *kernel)`, drawn on the CPU from
    `generator` (on the generator's device), then moved to `like`'s device and dtype.

    `uniform`: U(-s/sqrt(fan_in), s/sqrt(fan_in)), the distribution of PyTorch's default Linear and
    Conv weights; `gaussian`: N(0, s^2/fan_in); `xavier`: U(+-s sqrt(6/(fan_in + fan_out))).
    """
    shape = tuple(int(d) for d in shape)
    fan_in, fan_out = _fans(shape)
    on = generator.device  # a step's generator lives on the batch's device
    if init == "uniform":
        bound = scale / math.sqrt(fan_in)
        t = (torch.rand(shape, generator=generator, device=on) * 2 - 1) * bound
    elif init == "gaussian":
        t = torch.randn(shape, generator=generator, device=on) * (scale / math.sqrt(fan_in))
    elif init == "xavier":
        bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
        t = (torch.rand(shape, generator=generator, device=on) * 2 - 1) * bound
    else:
        raise UserError(f"unknown feedback init '{init}' (use {', '.join(FEEDBACK_INITS)})")
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype)
    return t


def block_output_shapes(network: Network, model_params: Params) -> list[tuple[int, ...]]:
    """Each block's output shape (without the batch dimension), from a forward pass on zeros."""
    like = next(iter(model_params.values()))
    with torch.no_grad():
        zeros = torch.zeros(2, *network.in_shape, device=like.device, dtype=like.dtype)
        hs, _ = network.activations(model_params, zeros)
    return [tuple(h.shape[1:]) for h in hs]


# -- layer-level feedback: the weight sends nothing back, its feedback tensor does -----------------
def _needs_input_grad(ctx) -> tuple[bool, ...]:
    # traced by torch.compile under torch.func.grad, needs_input_grad reads False for the weight
    # and bias (zero gradients, silently): there every gradient is computed, autograd drops the unused
    if torch.compiler.is_compiling():
        return (True,) * len(ctx.needs_input_grad)
    return ctx.needs_input_grad


class _FeedbackLinear(torch.autograd.Function):
    """`linear(x; W, b)` whose backward sends the input gradient through `B` (`g B`) and gives `W`
    and `b` their true gradients (`g^T x`, `sum g`). The feedback tensor gets no gradient."""

    @staticmethod
    def forward(x, weight, bias, feedback):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback = inputs
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        needs = _needs_input_grad(ctx)
        if g.dim() != 2:  # a batch of sequences or any other leading shape: the rows are the examples
            gx = g @ feedback if needs[0] else None
            g, x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        else:  # mm, not @: matmul's dispatch is a measurable part of a small layer's backward
            gx = g.mm(feedback) if needs[0] else None
        gw = g.t().mm(x) if needs[1] else None
        gb = g.sum(0) if ctx.has_bias and needs[2] else None
        return gx, gw, gb, None


class _FeedbackConvolution(torch.autograd.Function):
    """Any convolution (1-3d, transposed or not) whose backward is one `convolution_backward` call
    with the feedback tensor in the weight's place: the input gradient goes through `B`, and the
    weight gradient, which does not depend on the weight's value, is the true one."""

    @staticmethod
    def forward(x, weight, bias, feedback, stride, padding, dilation, transposed, output_padding, groups):
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, transposed,
                                          output_padding, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, feedback, *geometry = inputs
        ctx.save_for_backward(x, feedback)
        ctx.geometry = geometry
        ctx.bias_sizes = None if bias is None else list(bias.shape)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.geometry
        needs = _needs_input_grad(ctx)
        mask = [needs[0], needs[1], ctx.bias_sizes is not None and needs[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(g, x, feedback, ctx.bias_sizes, stride, padding, dilation,
                                                         transposed, output_padding, groups, mask)
        return gx, gw, gb, None, None, None, None, None, None, None


def _classic_form(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function in autograd's classic form (`forward` takes `ctx`), for plain autograd:
    `apply` on the `setup_context` form binds default arguments through `inspect` on every call
    (about 0.1 ms, a few percent of a small step), which only `torch.func` transforms need."""

    def forward(ctx, *inputs):
        output = function.forward(*inputs)
        function.setup_context(ctx, inputs, output)
        return output

    return type(function.__name__ + "Classic", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward)})


_CLASSIC = {f: _classic_form(f) for f in (_FeedbackLinear, _FeedbackConvolution)}


def _ntuple(v, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


def _arg(args, kwargs, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


_CONVOLUTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
# convolution module -> the function its forward calls, and -> its spatial dimensions
_CONVOLUTION_OF = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d}
_CONV_DIMS = {module: _CONVOLUTIONS[function] for module, function in _CONVOLUTION_OF.items()}
_TRANSPOSED = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}


def _routed(func, args, kwargs, feedback: torch.Tensor):
    """`func(*args, **kwargs)` (a linear map or convolution) with its input gradient sent through `feedback`."""
    x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    linear, convolution = _FeedbackLinear, _FeedbackConvolution
    if plain_autograd():
        linear, convolution = _CLASSIC[linear], _CLASSIC[convolution]
    if func is torch.nn.functional.linear:
        return linear.apply(x, weight, bias, feedback)
    if func in _CONVOLUTIONS:
        n = _CONVOLUTIONS[func]
        padding = _arg(args, kwargs, 4, "padding", 0)
        if padding == "valid":
            padding = 0
        if not isinstance(padding, str):
            return convolution.apply(
                x, weight, bias, feedback, _ntuple(_arg(args, kwargs, 3, "stride", 1), n), _ntuple(padding, n),
                _ntuple(_arg(args, kwargs, 5, "dilation", 1), n), False, [0] * n, _arg(args, kwargs, 6, "groups", 1))
    elif func in _TRANSPOSED:
        n = _TRANSPOSED[func]
        return convolution.apply(
            x, weight, bias, feedback, _ntuple(_arg(args, kwargs, 3, "stride", 1), n),
            _ntuple(_arg(args, kwargs, 4, "padding", 0), n), _ntuple(_arg(args, kwargs, 7, "dilation", 1), n), True,
            _ntuple(_arg(args, kwargs, 5, "output_padding", 0), n), _arg(args, kwargs, 6, "groups", 1))
    # padding="same": the additive form, layer(stop(x); W, b) + layer(x - stop(x); B, 0), same derivative
    shadow = [x - x.detach(), feedback, None, *args[3:]]
    return (func(x.detach(), *args[1:], **kwargs)
            + func(*shadow, **{k: v for k, v in kwargs.items() if k not in ("weight", "bias")}))


_ROUTABLE = (torch.nn.functional.linear, *_CONVOLUTIONS, *_TRANSPOSED)


class _FeedbackRouting(torch.overrides.TorchFunctionMode):
    """While active, a linear map or convolution whose weight is one of `routes`' tensors (matched
    by identity, so only the parameters handed to this call) runs through the feedback Functions."""

    def __init__(self, routes: dict[int, torch.Tensor]):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ROUTABLE:
            feedback = self.routes.get(id(_arg(args, kwargs, 1, "weight")))
            if feedback is not None:
                return _routed(func, args, kwargs, feedback)
        return func(*args, **kwargs)


def _is_plain_layer(layer: nn.Module) -> bool:
    """A plain Linear, or a convolution with zero padding (numeric or "same"): layers whose forward
    is one linear map or convolution of the weight."""
    return type(layer) is nn.Linear or (type(layer) in _CONV_DIMS and layer.padding_mode == "zeros")


class _SaveFeedback:
    """Pack hook for one routed layer call: where autograd saves the weight for the input gradient
    (`target`: the weight, which a convolution saves, or the view `W^T` a linear map saves), it
    saves the same view of the feedback tensor (`replacement`) instead. Autograd's own backward then
    sends the input gradient through `B`, and the weight and bias gradients, which read only the
    saved input, stay true: no Python runs in the backward pass. Exact for first derivatives only
    (`first_order`)."""

    __slots__ = ("target", "replacement", "routed")

    def __init__(self, target: torch.Tensor, replacement: torch.Tensor):
        self.target, self.replacement, self.routed = target, replacement, False

    def __call__(self, saved: torch.Tensor) -> torch.Tensor:
        if saved is self.target:
            self.routed = True
            return self.replacement
        return saved


def _unpack_saved(saved: torch.Tensor) -> torch.Tensor:
    return saved


def _routed_layer_forward(layer: nn.Module, feedback: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `layer.forward(x)` computes (a plain Linear or zero-padded convolution), routed by the
    feedback autograd Functions."""
    if type(layer) is nn.Linear:
        return _routed(torch.nn.functional.linear, (x, layer.weight, layer.bias), {}, feedback)
    return _routed(_CONVOLUTION_OF[type(layer)], (x, layer.weight, layer.bias, layer.stride, layer.padding,
                                                  layer.dilation, layer.groups), {}, feedback)


def _hooked_layer_forward(layer: nn.Module, feedback: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `layer.forward(x)` computes, by the same kernels, with `B` saved where autograd saves
    the weight (`_SaveFeedback`); the Function route where autograd saved no such tensor."""
    weight, bias = layer.weight, layer.bias
    if type(layer) is nn.Linear and x.dim() == 2:
        # F.linear's own decomposition, with the `W^T` that the product saves at hand to match
        weight_t = weight.t()
        pack = _SaveFeedback(weight_t, feedback.t())
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack_saved):
            out = torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    else:
        pack = _SaveFeedback(weight, feedback)
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack_saved):
            out = type(layer).forward(layer, x)
    if pack.routed or not (x.requires_grad and torch.is_grad_enabled()):
        return out
    return _routed_layer_forward(layer, feedback, x)


def _layers_called_once(network: Network) -> dict[int, nn.Module]:
    """The plain Linear and zero-padded convolution layers (by id) that the network's own forward
    calls exactly once and nothing else reads: a block itself, a `Block`'s layer, a head's layer."""
    found = {}
    for module in [*network.blocks, *network.heads.values()]:
        layer = module.layer if isinstance(module, Block) else module
        if _is_plain_layer(layer) and "forward" not in vars(layer):  # (a forward set on the instance is someone else's)
            found[id(layer)] = layer
    return found


# network -> {routed keys: their layers, or None where a key is not a plain layer's weight}
_LAYERS_OF_KEYS: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def _direct_routes(module: nn.Module, feedback: Mapping[str, torch.Tensor]) -> list | None:
    """`[(layer, feedback tensor)]` when every weight in `feedback` belongs to a layer of
    `_layers_called_once`, else None. Worked out once per network and set of keys."""
    if not isinstance(module, Network) or torch.compiler.is_compiling():
        return None
    keys = tuple(feedback)
    known = _LAYERS_OF_KEYS.setdefault(module, {})
    if keys not in known:
        slots, layers = parameter_slots(module) or {}, _layers_called_once(module)
        owners = [slots.get(k, (None, None)) for k in keys]
        plain = all(leaf == "weight" and id(owner) in layers for owner, leaf in owners)
        known[keys] = [owner for owner, _ in owners] if plain else None
    layers = known[keys]
    return None if layers is None else list(zip(layers, feedback.values()))


def feedback_call(module: nn.Module, params: Params, args: tuple, feedback: Mapping[str, torch.Tensor],
                  kwargs: dict | None = None):
    """`call_with(module, params, args, kwargs)` in which every weight named in `feedback`
    (keys of `params`) sends its layer's input gradient through its feedback tensor, under plain
    autograd and under `torch.func` alike, each parameter keeping its true gradient. Three routes,
    one result (tested against each other):

    - every routed weight a plain layer of a `Network` (`_layers_called_once`), under plain
      autograd at first order (`first_order`): the layer's own forward runs with `B` saved where
      autograd saves the weight, so the backward pass is autograd's own (`_hooked_layer_forward`);
    - the same layers under `torch.func`, nested differentiation or the memory probe: each layer's
      `forward` is replaced for the call by the feedback autograd Functions;
    - anywhere else, a torch function mode routes every linear map or convolution made with those
      weights (by identity), which costs a Python call per torch function of the forward."""
    if not feedback:
        return call_with(module, params, args, kwargs)
    routes = _direct_routes(module, feedback)
    if routes is None:
        with _FeedbackRouting({id(params[k]): b for k, b in feedback.items()}):
            return call_with(module, params, args, kwargs)
    routed = _hooked_layer_forward if first_order() else _routed_layer_forward
    try:  # (object's own attribute calls: nn.Module's cost ~3 us each, a visible part of a small step)
        for layer, b in routes:
            object.__setattr__(layer, "forward", functools.partial(routed, layer, b))
        return call_with(module, params, args, kwargs)
    finally:
        for layer, _ in routes:
            if "forward" in vars(layer):
                object.__delattr__(layer, "forward")


# -- one block -------------------------------------------------------------------------------------
def _sub(params: Params, prefix: str) -> Params:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _reshape(block, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], *block.in_shape) if block.in_shape is not None else x


def _nonlinearity(block, local: Params, a: torch.Tensor) -> torch.Tensor:
    """`post(activation(a))`, the part of a block after its layer."""
    h = call_with(block.activation, _sub(local, "activation"), (a,))
    return call_with(block.post, _sub(local, "post"), (h,))


def _globalize(network: Network, i: int, local_grads: Params) -> Params:
    return {k: local_grads[lk] for k, lk in network.block_keys[i].items()}


def block_pullback(network: Network, i: int, model_params: Params, x: torch.Tensor,
                   feedback: Mapping[str, torch.Tensor] | None = None, input_grad: bool = True):
    """Run block `i` on `x` under a `vjp`: returns `(h, pullback)`.

    `pullback(g)`, for a cotangent `g` at the block output `h`, returns `(grads, gx)`: `grads` is
    the block's true local parameter gradient (global keys) and `gx` the signal at `x`, sent
    through the feedback tensors of `feedback` (local weight key -> tensor) in place of those
    weights (backprop where `feedback` is empty), or None when `input_grad` is False.
    """
    local = network.block_params(i, model_params)
    block = network.blocks[i]
    if not input_grad:
        h, fn = vjp(lambda p: network.block_apply_local(i, p, x), local)

        def pullback(g):
            (gp,) = fn(g)
            return _globalize(network, i, gp), None

        return h, pullback
    h, fn = vjp(lambda p, xin: feedback_call(block, p, (xin,), feedback or {}), local, x)

    def pullback(g):
        gp, gx = fn(g)
        return _globalize(network, i, gp), gx

    return h, pullback


def output_error(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(e, loss)`: the cross-entropy and its gradient with respect to the logits."""
    return grad_and_value(lambda z: classification_loss(z, y))(logits)


def xavier_std(shape) -> float:
    """`sqrt(2 / (fan_in + fan_out))` of a weight shape: the standard deviation of Xavier's init."""
    fan_in, fan_out = _fans(tuple(shape))
    return math.sqrt(2.0 / (fan_in + fan_out))


def conv_projection_shape(network: Network, i: int, classes: int) -> tuple[int, ...] | None:
    """Shape (classes, block i's channels, *kernel) of a structured projection to block `i`'s
    output, or None when block `i + 1`'s layer is not a plain Conv2d reading that output."""
    if i + 1 >= network.num_blocks:
        return None
    nxt = network.blocks[i + 1]
    if not isinstance(nxt, Block) or not isinstance(nxt.layer, nn.Conv2d) or nxt.layer.groups != 1 or nxt.in_shape is not None:
        return None
    return (classes, nxt.layer.in_channels, *nxt.layer.kernel_size)


def _conv_project(e: torch.Tensor, kernel: torch.Tensor, layer: nn.Conv2d, shape) -> torch.Tensor:
    """The error broadcast over the positions of `layer`'s output, sent back to its input (block
    output `shape`) by the transposed convolution with `kernel` and `layer`'s geometry."""
    c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    tiled = e[:, :, None, None].expand(e.shape[0], e.shape[1], out_h, out_w)
    return torch.nn.grad.conv2d_input((e.shape[0], c, h, w), kernel, tiled, stride=layer.stride,
                                      padding=layer.padding, dilation=layer.dilation)


def _project(e: torch.Tensor, projection: torch.Tensor, shape: tuple[int, ...], network: Network | None = None,
             i: int | None = None) -> torch.Tensor:
    """`projection @ e` for each example, shaped like a block output (`projection`: (numel, classes)),
    or the structured projection through block `i + 1`'s convolution geometry for a 4-d kernel."""
    if projection.dim() == 4:
        return _conv_project(e, projection, network.blocks[i + 1].layer, shape)
    return (e @ projection.T).reshape(e.shape[0], *shape)


# -- error routing ---------------------------------------------------------------------------------
def chained_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                               feedback: Mapping[str | int, torch.Tensor]):
    """`(grads, loss)` with the error sent down layer by layer: every weight named in `feedback`
    (a global key, or a block index for that block's `layer.weight`) sends its layer's input
    gradient through its feedback tensor, every other through itself (backprop). One gradient of
    the loss over one forward pass, the layers routed by `feedback_call`: each parameter gets its
    true local gradient for the signal that reaches its layer, batch norm included."""
    routes = {weight_key(k) if isinstance(k, int) else k: b for k, b in feedback.items()}
    if closed_form_allowed() and _closed_form_chain_fits(network, routes):
        return _closed_form_chain(network, model_params, x, y, routes)
    grads, loss = grad_and_value(
        lambda p: classification_loss(feedback_call(network, p, (x,), routes), y))(model_params)
    return grads, loss


# network -> {routed keys: whether `_closed_form_chain` runs it}
_CLOSED_FORM_CHAINS: "weakref.WeakKeyDictionary[Network, dict]" = weakref.WeakKeyDictionary()


def _closed_form_chain_fits(network: Network, routes: Mapping[str, torch.Tensor]) -> bool:
    """Whether every block is a plain `Block` whose layer `_closed_form_layer_backward` takes and
    whose activation and post `_closed_form_transpose` takes, with no other parameters, no heads,
    and every routed key a block's layer weight. Worked out once per network and set of keys."""
    keys = tuple(routes)
    known = _CLOSED_FORM_CHAINS.setdefault(network, {})
    if keys not in known:
        blocks_fit = not len(network.heads) and (network.out_shape is None or len(network.out_shape) <= 1) and all(
            type(block) is Block and "forward" not in vars(block) and _has_closed_form_grads(block.layer)
            and _has_closed_form_transpose(block) and all(k.startswith("layer.") for k in network.block_keys[i].values())
            for i, block in enumerate(network.blocks))
        layer_weights = {weight_key(i) for i in range(network.num_blocks)}
        known[keys] = blocks_fit and set(keys) <= layer_weights
    return known[keys]


def _closed_form_block_forward(network: Network, i: int, model_params: Params, h: torch.Tensor):
    """`(record, output)`: block `i` (of a network that `_closed_form_chain_fits`) on `h` without a
    graph, and what its closed-form backward needs: `(local params, block input, layer input,
    pre-activation, activation, pooling indices)`."""
    block, local = network.blocks[i], network.block_params(i, model_params)
    with torch.no_grad():
        layer_input = _reshape(block, h)
        a = _layer_forward(block, local, layer_input)
        z = block.activation(a)
        out, indices = _post_forward(block, local, z)
    return (local, h, layer_input, a, z, indices), out


def _closed_form_forward(network: Network, model_params: Params, x: torch.Tensor):
    """`(records, output)`: the network's forward pass without a graph, each block's record kept."""
    records, h = [], x
    for i in range(network.num_blocks):
        record, h = _closed_form_block_forward(network, i, model_params, h)
        records.append(record)
    return records, h


def _closed_form_block_backward(network: Network, i: int, record, g: torch.Tensor,
                                feedback: torch.Tensor | None = None) -> tuple[Params, torch.Tensor | None]:
    """`(grads, gx)` for block `i`, its forward `record` and the signal `g` at its output: its true
    parameter gradients (global keys) and, given `feedback`, the signal at its input sent through
    it in its layer weight's place (shaped like the block's input)."""
    block = network.blocks[i]
    local, block_input, layer_input, a, z, indices = record
    (delta,) = _closed_form_transpose(block, local, a, z, indices, g)
    local_grads, gx = _closed_form_layer_backward(block, local, layer_input, delta, feedback)
    return _globalize(network, i, local_grads), None if gx is None else gx.reshape(block_input.shape)


def _closed_form_chain(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                       routes: Mapping[str, torch.Tensor]):
    """`chained_feedback_gradients` for networks `_closed_form_chain_fits`, as a hand-written loop:
    a forward pass without a graph that keeps each layer's input, pre-activation and activation,
    then from the output down, per block, the signal taken back through its post and activation
    (`delta_a`), the layer's true gradients `delta_a x^T`, and the signal at its input through the
    feedback tensor (`B^T delta_a`, or `W^T delta_a` where the weight has none). The same
    arithmetic as the graph route without autograd's bookkeeping (tested against it)."""
    records, logits = _closed_form_forward(network, model_params, x)
    e, loss = output_error(logits, y)
    grads: Params = {}
    g = e
    for i in reversed(range(network.num_blocks)):
        feedback = routes.get(weight_key(i), records[i][0]["layer.weight"]) if i else None
        block_grads, g = _closed_form_block_backward(network, i, records[i], g, feedback)
        grads.update(block_grads)
    return grads, loss


def _cut_chain(network: Network, x: torch.Tensor) -> Callable[[Params], tuple[torch.Tensor, ...]]:
    """`params -> (h_0, ..., h_L)`: every block's output, each block's input cut from the graph, so
    that one `vjp` of it gives every block its local parameter gradients for a signal at its own
    output (one backward pass, no chain through the blocks)."""
    def outputs(model_params: Params) -> tuple[torch.Tensor, ...]:
        hs, h = [], x
        for i in range(network.num_blocks):
            h = network.block_apply(i, model_params, h.detach())
            hs.append(h)
        return tuple(hs)

    return outputs


def direct_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                              projections: Mapping[int, torch.Tensor], outputs: list | None = None):
    """`(grads, loss)` where hidden block `i` receives `projections[i] @ e` at its output (a matrix
    of shape (block output numel, classes), or a conv kernel: see the module docstring); the output
    block receives `e`. Block outputs are appended to `outputs` when it is given. Where
    `closed_form_allowed`, a network that `_closed_form_chain_fits` takes it without a graph: one
    forward pass, then each block's transpose and true gradients for its own signal."""
    if closed_form_allowed() and _closed_form_chain_fits(network, {}):
        records, logits = _closed_form_forward(network, model_params, x)
        hs = [*(record[1] for record in records[1:]), logits]  # each block's output: the next one's input
        e, loss = output_error(logits, y)
        grads: Params = {}
        for i, h in enumerate(hs):
            signal = e if i == len(hs) - 1 else _project(e, projections[i], tuple(h.shape[1:]), network, i)
            grads.update(_closed_form_block_backward(network, i, records[i], signal)[0])
        if outputs is not None:
            outputs.extend(hs)
        return grads, loss
    hs, pullback = vjp(_cut_chain(network, x), model_params)
    if outputs is not None:
        outputs.extend(hs)
    e, loss = output_error(hs[-1], y)
    signals = [_project(e, projections[i], tuple(h.shape[1:]), network, i) for i, h in enumerate(hs[:-1])]
    (grads,) = pullback((*signals, e))
    return grads, loss


class _LayerInputs(torch.overrides.TorchFunctionMode):
    """While active, every linear map or convolution whose weight is one of `keys_of`' tensors (by
    identity) runs on its input cut from the graph, and its input (still on the graph) is kept with
    the call's geometry: no signal passes down through that weight."""

    def __init__(self, keys_of: dict[int, str]):
        super().__init__()
        self.keys_of = keys_of
        self.calls: list[tuple[str, torch.Tensor, Callable]] = []  # (key, input, input -> projected error)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = self.keys_of.get(id(_arg(args, kwargs, 1, "weight"))) if func in _ROUTABLE else None
        if key is None:
            return func(*args, **kwargs)
        if func in _TRANSPOSED:
            raise UserError(f"layer-level direct feedback alignment has no projection for the transposed "
                            f"convolution of '{key}'")
        x = args[0]
        if func is torch.nn.functional.linear:
            def reading(x_, d):  # (N, ..., classes) -> (N, classes)
                out = torch.nn.functional.linear(x_, d)
                return out.reshape(out.shape[0], -1, out.shape[-1]).sum(1)
        else:
            geometry = {name: _arg(args, kwargs, i, name, default)
                        for i, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))}

            def reading(x_, d, _func=func, _geometry=geometry):  # (N, classes, *positions) -> (N, classes)
                return _func(x_, d, None, **_geometry).flatten(2).sum(2)
        self.calls.append((key, x, reading))
        return func(x.detach(), *args[1:], **kwargs)


def layer_direct_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                                    projections: Mapping[str, torch.Tensor]):
    """`(grads, loss)` of direct feedback alignment at every layer (Nøkland 2016 writes DFA per
    layer; this is what BioTorch's `dfa` mode computes): each linear map or convolution whose weight
    is a key of `projections` sends down, in place of `W^T g`, the output error `e = dL/d(logits)`
    projected to its input by its own fixed random `D`; its weight and bias get their true
    gradients for the signal `g` arriving at its output.

    `D` is shaped as BioTorch shapes it (`layer_projection_shapes`): `(classes, in_features)` for a
    Linear, whose input receives `e D`; `(classes, in_channels, *kernel)` for a convolution, whose
    input receives `e` copied to every output position and sent back by the transposed convolution
    with `D` and the layer's stride, padding and dilation (groups 1). What arrives at a layer's
    output is that injection taken back, as backprop would, through everything between it and the
    layers above that read it: batch norm (trained by its true gradient), activations, pooling,
    residual additions (the skip path adds its share). The last layer's output receives `e` itself.

    One gradient of a surrogate over one forward pass: the layers run on their inputs cut from the
    graph (`_LayerInputs`), then `L + sum_l <D_l-reading of x_l, stop(e)>`, whose derivative with
    respect to a layer input `x_l` is exactly the projected error; plain autograd and `torch.func`
    alike."""
    def surrogate(p: Params):
        inputs = _LayerInputs({id(p[k]): k for k in projections})
        with inputs:
            logits = call_with(network, p, (x,))
        loss = classification_loss(logits, y)
        e = output_error(logits.detach(), y)[0]
        injected = sum(((reading(x_l, projections[key]) * e).sum() for key, x_l, reading in inputs.calls),
                       logits.new_zeros(()))
        return loss + injected, loss

    grads, (_, loss) = grad_and_value(surrogate, has_aux=True)(model_params)
    return grads, loss.detach()


def layer_projection_shapes(network: Network, model_params: Params, keys, classes: int) -> dict[str, tuple]:
    """`{key: shape}` of layer-level DFA's projections (`layer_direct_feedback_gradients`), from one
    forward pass on zeros: `(classes, in_features)` for a linear map's weight, `(classes,
    in_channels, *kernel)` for a convolution's (the whole input, whatever its groups), as BioTorch
    shapes its `weight_backward`; a weight called more than once shares one projection."""
    like = next(iter(model_params.values()))
    inputs = _LayerInputs({id(model_params[k]): k for k in keys})
    with torch.no_grad(), inputs:
        call_with(network, model_params, (torch.zeros(2, *network.in_shape, device=like.device, dtype=like.dtype),))
    shapes = {}
    for key, x_l, _ in inputs.calls:
        kernel = tuple(model_params[key].shape[2:])
        shapes.setdefault(key, (classes, x_l.shape[-1]) if not kernel else (classes, x_l.shape[1], *kernel))
    return {k: shapes[k] for k in keys if k in shapes}


def one_hot(y: torch.Tensor, classes: int, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, classes).to(like.dtype)


def target_projection_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                                projections: Mapping[int, torch.Tensor]):
    """`(grads, loss)` where hidden block `i` receives `projections[i] @ y*` at its output, `y*` the
    one-hot target. Each block's local gradient is taken as soon as the forward pass has run it,
    and its pullback is dropped before the next block runs, so the graph never spans two blocks
    (no backward pass); the output block receives `e`. Where `closed_form_allowed`, a network that
    `_closed_form_chain_fits` runs each block without a graph and takes its gradients in closed
    form, its record dropped before the next block runs as well."""
    last = network.num_blocks - 1
    by_hand = closed_form_allowed() and _closed_form_chain_fits(network, {})
    grads: Params = {}
    target = None
    h = x
    for i in range(network.num_blocks):
        if by_hand:
            record, h = _closed_form_block_forward(network, i, model_params, h)
            pb = functools.partial(_closed_form_block_backward, network, i, record)
            del record
        else:
            h, pb = block_pullback(network, i, model_params, h, input_grad=False)
        if i == last:
            e, loss = output_error(h, y)
            grads.update(pb(e)[0])
        else:
            if target is None:
                target = one_hot(y, projections[i].shape[0] if projections[i].dim() == 4 else projections[i].shape[1], h)
            grads.update(pb(_project(target, projections[i], tuple(h.shape[1:]), network, i))[0])
        del pb  # frees the block's saved tensors (or record) before the next block runs
    return grads, loss


def _jvp(fn: Callable, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The directional derivative of `fn` at `primal` along `tangent` (forward mode): with torch's
    dual tensors under plain autograd (a fraction of `torch.func.jvp`'s per-call cost), with
    `torch.func.jvp` inside a `torch.func` transform, where it composes."""
    if not torch.compiler.is_compiling():  # (under tracing the warm-up itself would be traced)
        load_forward_ad()  # the trainer did already; a rule called directly may not have
    if not plain_autograd():
        return torch.func.jvp(fn, (primal,), (tangent,))[1]
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(fn(forward_ad.make_dual(primal, tangent))).tangent


def indirect_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                                projection: torch.Tensor):
    """`(grads, loss)`: the first hidden block receives `projection @ e` at its output; its
    pre-activation signal `delta_a_0` then travels forward along the forward path: for each later
    hidden block `delta_a_i = f'(a_i) * layer_i(t_{i-1}; W_i, no bias)`, where `t` is the signal
    carried through the block's `post` (pooling) as the activations are (`t = delta_a` without one).
    Each hidden layer's update is `delta_a_i x_i^T`; `post` parameters (batch norm) are not trained.
    The output block receives `e`.

    Where `closed_form_allowed` (plain autograd, nothing differentiating through, not the memory
    probe), plain Linear and convolution layers run without a graph and take that update in closed
    form (the output block's too, when it is a bare layer), the first block's elementwise activation
    and max pooling are transposed in closed form, and the activations' derivatives use autograd's
    own kernels on the stored activations (the arithmetic of a hand-written IFA loop); other layers
    and activations, `torch.func` transforms and the probe take the generic `vjp` / forward-mode
    path (the two agree: `tests/test_feedback_alignment.py`)."""
    last = network.num_blocks - 1
    by_hand = closed_form_allowed()
    pre, posts, layer_pullbacks = [], [], []
    h = x
    for i in range(last):
        block, local = network.blocks[i], network.block_params(i, model_params)
        if by_hand and _has_closed_form_grads(block.layer):
            # no graph: the update `delta_a x^T` is taken in closed form below
            layer_input = _reshape(block, h)
            with torch.no_grad():
                a = call_with(block.layer, _sub(local, "layer"), (layer_input,))
            fn = functools.partial(_closed_form_grads, block, local, layer_input)
        else:
            a, fn = vjp(lambda p, _i=i, _x=h: network.block_apply_local(_i, p, _x, pre_activation=True), local)
        pre.append(a)
        layer_pullbacks.append(fn)
        if i == 0 and not (by_hand and _has_closed_form_transpose(block)):
            # the error arrives at this block's output: keep the pullback to its pre-activation
            h, first_pullback, (z, *indices) = vjp(lambda a_: _nonlinearity_with_aux(block, local, a_), a, has_aux=True)
            post_inputs = (z, indices[0] if indices else None)
        else:
            z = call_with(block.activation, _sub(local, "activation"), (a,))
            h, indices = _post_forward(block, local, z)
            post_inputs = (z, indices)
            if i == 0:  # an elementwise activation, then identity or max pooling: transposed in closed form
                first_pullback = functools.partial(_closed_form_transpose, block, local, a, z, indices)
        if i == 0:
            first_shape = tuple(h.shape[1:])
        posts.append(post_inputs)
    out = network.blocks[last]
    if by_hand and _has_closed_form_grads(out.layer) and _is_identity(out.activation) and _is_identity(out.post):
        out_local, out_input = network.block_params(last, model_params), _reshape(out, h)
        with torch.no_grad():
            logits = call_with(out.layer, _sub(out_local, "layer"), (out_input,))
        e, loss = output_error(logits, y)
        grads: Params = _globalize(network, last, _closed_form_grads(out, out_local, out_input, e)[0])
    else:
        logits, out_pullback = block_pullback(network, last, model_params, h, input_grad=False)
        e, loss = output_error(logits, y)
        grads = dict(out_pullback(e)[0])
    t = None
    for i in range(last):
        block = network.blocks[i]
        local = network.block_params(i, model_params)
        if i == 0:
            (delta,) = first_pullback(_project(e, projection, first_shape))
        else:
            delta = _activation_jvp(block, local, pre[i], posts[i][0],
                                    _layer_without_bias(block, local, local["layer.weight"], t))
        (gp,) = layer_pullbacks[i](delta)
        grads.update(_globalize(network, i, gp))
        t = _carry(block, local, *posts[i], delta)
    return grads, loss


def _has_closed_form_grads(layer: nn.Module) -> bool:
    """A plain Linear, or a convolution with numeric zero padding: layers whose weight gradient for
    a signal at their output `_closed_form_grads` takes without a graph."""
    return _is_plain_layer(layer) and not isinstance(getattr(layer, "padding", 0), str)


def _layer_forward(block, local: Params, x: torch.Tensor) -> torch.Tensor:
    """A plain Linear or convolution layer (`_has_closed_form_grads`) on `x` with `local`'s weights."""
    layer, weight, bias = block.layer, local["layer.weight"], local.get("layer.bias")
    if type(layer) is nn.Linear:
        return torch.nn.functional.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def _closed_form_layer_backward(block, local: Params, x: torch.Tensor, delta: torch.Tensor,
                                feedback: torch.Tensor | None = None) -> tuple[Params, torch.Tensor | None]:
    """`(grads, gx)`: the layer's true weight and bias gradients for the signal `delta` at its
    output, `x` its input (`delta^T x` for Linear, one `convolution_backward` call for a
    convolution), zeros for the block's other parameters (batch norm in `post`); and, given
    `feedback`, the signal at the layer's input sent through it in the weight's place (else None)."""
    layer, weight = block.layer, local["layer.weight"]
    grads = {k: torch.zeros_like(v) for k, v in local.items() if not k.startswith("layer.")}
    gx = None
    if type(layer) is nn.Linear:
        d2 = delta.reshape(-1, delta.shape[-1])
        if feedback is not None:
            gx = delta.mm(feedback) if delta.dim() == 2 else delta @ feedback
        grads["layer.weight"] = d2.T @ x.reshape(-1, x.shape[-1])
        if "layer.bias" in local:
            grads["layer.bias"] = d2.sum(0)
        return grads, gx
    n = _CONV_DIMS[type(layer)]
    bias_sizes = list(local["layer.bias"].shape) if "layer.bias" in local else None
    gx, gw, gb = torch.ops.aten.convolution_backward(
        delta, x, weight if feedback is None else feedback, bias_sizes, _ntuple(layer.stride, n),
        _ntuple(layer.padding, n), _ntuple(layer.dilation, n), False, [0] * n, layer.groups,
        [feedback is not None, True, bias_sizes is not None])
    grads["layer.weight"] = gw
    if bias_sizes is not None:
        grads["layer.bias"] = gb
    return grads, gx


def _closed_form_grads(block, local: Params, x: torch.Tensor, delta: torch.Tensor) -> tuple[Params]:
    """`(grads,)` like a block pullback's: `_closed_form_layer_backward`'s parameter gradients."""
    return (_closed_form_layer_backward(block, local, x, delta)[0],)


def _activation_jvp(block, local: Params, a: torch.Tensor, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The derivative of the block's activation at `a` (`z` its value there) along `d`: in closed
    form for the identity, tanh, relu, leaky relu and sigmoid (autograd's own kernels), by
    forward-mode AD for any other."""
    activation = block.activation
    if isinstance(activation, nn.Identity):
        return d
    if type(activation) is nn.Tanh:  # d * (1 - z^2), autograd's own fused kernel
        return torch.ops.aten.tanh_backward(d, z)
    if type(activation) is nn.ReLU:  # d where a > 0, else 0
        return torch.ops.aten.threshold_backward(d, a, 0.0)
    if type(activation) is nn.LeakyReLU:  # d where a > 0, else slope * d
        return torch.ops.aten.leaky_relu_backward(d, a, activation.negative_slope, False)
    if type(activation) is nn.Sigmoid:  # d * z (1 - z)
        return torch.ops.aten.sigmoid_backward(d, z)
    return _jvp(lambda a_: call_with(activation, _sub(local, "activation"), (a_,)), a, d)


_CLOSED_FORM_ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.Sigmoid)


def _is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def _has_closed_form_transpose(block) -> bool:
    """An activation `_activation_jvp` differentiates in closed form (elementwise, so its transpose
    is itself) and that keeps its input (not in place), then no post or a max pooling that
    `_post_forward` runs with indices."""
    activation = block.activation
    elementwise = _is_identity(activation) or (type(activation) in _CLOSED_FORM_ACTIVATIONS
                                               and not getattr(activation, "inplace", False))
    post = block.post
    return elementwise and (_is_identity(post) or (type(post) is nn.MaxPool2d and not post.return_indices))


def _closed_form_transpose(block, local: Params, a: torch.Tensor, z: torch.Tensor, indices: torch.Tensor | None,
                           g: torch.Tensor) -> tuple[torch.Tensor]:
    """`(delta_a,)`: the signal `g` at the block's output taken back through its post (max pooling
    sends each entry to the position its forward picked) and its elementwise activation."""
    if indices is not None:
        g = torch.zeros_like(z).flatten(2).scatter_add_(2, indices.flatten(2), g.flatten(2)).view_as(z)
    return (_activation_jvp(block, local, a, z, g),)


def _post_forward(block, local: Params, z: torch.Tensor):
    """`(post(z), indices)`: max pooling also returns the positions it picked, anything else None."""
    post = block.post
    if isinstance(post, nn.Identity):
        return z, None
    if type(post) is nn.MaxPool2d and not post.return_indices:
        return max_pool_with_indices(post, z)
    return call_with(post, _sub(local, "post"), (z,)), None


def _nonlinearity_with_aux(block, local: Params, a: torch.Tensor):
    """`(post(activation(a)), (activation(a), [indices]))`: the block after its layer, and what
    `_carry` needs (tensors only: torch.func's auxiliary outputs take no None)."""
    z = call_with(block.activation, _sub(local, "activation"), (a,))
    h, indices = _post_forward(block, local, z)
    return h, (z,) if indices is None else (z, indices)


def _carry(block, local: Params, z: torch.Tensor, indices: torch.Tensor | None, d: torch.Tensor) -> torch.Tensor:
    """The derivative of the block's `post` at `z` along `d`: how a signal rides forward through
    pooling or batch norm. The identity carries `d` itself, max pooling the entries of `d` at the
    positions its forward picked (no second pooling), anything else forward-mode AD."""
    if isinstance(block.post, nn.Identity):
        return d
    if indices is not None:
        return d.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    return _jvp(lambda z_: call_with(block.post, _sub(local, "post"), (z_,)), z.detach(), d)


# -- learned feedback: the reverse pass and the weight mirror -----------------------------------------
def _layer_without_bias(block, local: Params, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`block`'s layer with `weight` and no bias: the linear part of an affine layer (a plain
    Linear or convolution called directly; any other layer with its other parameters zeroed)."""
    layer, x = block.layer, _reshape(block, x)
    if type(layer) is nn.Linear:
        return torch.nn.functional.linear(x, weight)
    if type(layer) in _CONV_DIMS:
        return layer._conv_forward(x, weight, None)
    zeroed = {k: weight if k == "weight" else torch.zeros_like(v) for k, v in _sub(local, "layer").items()}
    return call_with(layer, zeroed, (x,))


def _layer_adjoint(block, local: Params, weight: torch.Tensor, g: torch.Tensor, in_like: torch.Tensor):
    """The transpose of the layer's linear part with `weight`, applied to `g` (shaped like the
    layer output): `weight^T g` for Linear, the transposed convolution for a convolution."""
    _, fn = vjp(lambda x: _layer_without_bias(block, local, weight, x), torch.zeros_like(in_like))
    return fn(g)[0]


def _weight_gradient(block, local: Params, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d<g, layer(x; B, 0)>/dB: the layer's weight gradient for input `x` and output cotangent `g`."""
    weight = _sub(local, "layer")["weight"]
    _, fn = vjp(lambda w: _layer_without_bias(block, local, w, x), weight)
    return fn(g)[0]


def _forward_trace(network: Network, model_params: Params, x: torch.Tensor):
    """Per block: its input and `activation(a)` (where `post` linearises), without a graph."""
    inputs, acts = [], []
    h = x
    with torch.no_grad():
        for i in range(network.num_blocks):
            block, local = network.blocks[i], network.block_params(i, model_params)
            inputs.append(h)
            a = call_with(block.layer, _sub(local, "layer"), (_reshape(block, h),))
            z = call_with(block.activation, _sub(local, "activation"), (a,))
            acts.append(z)
            h = call_with(block.post, _sub(local, "post"), (z,))
    return inputs, acts


def reverse_feedback_gradients(network: Network, model_params: Params, feedback: Mapping[int, torch.Tensor],
                               x: torch.Tensor, y: torch.Tensor, classes: int):
    """`(feedback grads, reverse loss)` of the reverse pass of bidirectional feedback alignment.

    The network runs backwards from the one-hot target `y*`: block `l`'s signal `g_l` (shaped like
    its output) goes through the adjoint of its `post` (pooling routes by the forward pass's
    selection) and the adjoint of its layer with `B_l` (`B_l^T`; a transposed convolution), then
    through block `l-1`'s activation: `g_{l-1} = f_{l-1}(B_l^T P_l^T g_l)`, `g_{L-1} = y*`, and the
    input reconstruction is `x^ = B_0^T P_0^T g_0` (no activation, no reverse biases). Loss
    `0.5 * |x^ - x|^2`, summed over features, mean over the batch. It is trained like feedback
    alignment in reverse: the reverse error reaching `g_l` is sent through the *forward* weight
    `W_l` (`P_l W_l delta` in place of `P_l B_l delta`), and each `B_l` gets its true local gradient.
    Returns gradients for every block `0..L-1` (keys `blocks.l.layer.weight`).
    """
    last = network.num_blocks - 1
    inputs, acts = _forward_trace(network, model_params, x)
    locals_ = [network.block_params(i, model_params) for i in range(network.num_blocks)]
    posts = []  # (vjp of post at the forward activation) per block
    for i, block in enumerate(network.blocks):
        _, fn = vjp(lambda z, _b=block, _l=locals_[i]: call_with(_b.post, _sub(_l, "post"), (z,)), acts[i])
        posts.append(fn)
    # reverse pass, from the target down to the input
    g = one_hot(y, classes, x)
    # u_l = P_l^T g_l; pre[l-1] = B_l^T u_l; reverse_act[l-1] = f_{l-1}(pre[l-1]) = g_{l-1}
    u, pre, reverse_act = [None] * (last + 1), [None] * (last + 1), [None] * (last + 1)
    for l in range(last, -1, -1):
        block = network.blocks[l]
        u[l] = posts[l](g)[0]
        r = _layer_adjoint(block, locals_[l], feedback[l], u[l], _reshape(block, inputs[l]))
        if l == 0:
            x_hat = r.reshape(x.shape)
        else:
            r = r.reshape(inputs[l].shape)
            pre[l - 1] = r
            prev = network.blocks[l - 1]
            g = reverse_act[l - 1] = call_with(prev.activation, _sub(locals_[l - 1], "activation"), (r,))
    n = x.shape[0]
    loss = 0.5 * ((x_hat - x) ** 2).sum() / n
    # reverse errors, from the input back up, through the forward weights
    delta = (x_hat - x) / n
    grads: Params = {}
    for l in range(last + 1):
        block = network.blocks[l]
        d_in = _reshape(block, delta.reshape(inputs[l].shape))
        grads[weight_key(l)] = _weight_gradient(block, locals_[l], d_in, u[l])
        if l == last:
            break
        t = _layer_without_bias(block, locals_[l], locals_[l]["layer.weight"], d_in)
        t = _carry(block, locals_[l], acts[l], None, t)
        # elementwise activations: the transpose is the derivative itself, f'(pre) * t
        delta = _activation_jvp(block, locals_[l], pre[l], reverse_act[l], t)
    return grads, loss


def mirror_gradients(network: Network, model_params: Params, blocks, noise: Mapping[int, torch.Tensor],
                     feedback: Mapping[int, torch.Tensor], decay: float, response: str = "linear"):
    """Weight-mirror pseudo-gradients for the feedback tensors of `blocks`.

    Block `l`'s layer is driven by `noise[l]` (shaped like its input) and responds with
    `r = layer(xi; W_l, 0)` (`response="linear"`) or `r = f(layer(xi; W_l, b_l))` (`"forward"`).
    The mirror update is `dB_l = xi r^T` in the paper's layout (`r xi^T` for our `B_l` shaped like
    `W_l`; for a convolution the same correlation summed over positions), averaged over examples and
    output positions, minus `decay * B_l`; returned with the sign of a gradient, to be descended.
    """
    grads: Params = {}
    for l in blocks:
        block, local = network.blocks[l], network.block_params(l, model_params)
        xi = _reshape(block, noise[l])
        with torch.no_grad():
            if response == "linear":
                r = _layer_without_bias(block, local, local["layer.weight"], xi)
            elif response == "forward":
                a = call_with(block.layer, _sub(local, "layer"), (xi,))
                r = call_with(block.activation, _sub(local, "activation"), (a,))
            else:
                raise UserError(f"unknown mirror response '{response}' (use linear or forward)")
        count = r.numel() // r.shape[1]  # examples x output positions
        correlation = _weight_gradient(block, local, xi, r) / count
        grads[weight_key(l)] = decay * feedback[l] - correlation
    return grads
