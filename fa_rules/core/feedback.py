"""Sending an error signal through blocks with substitute feedback tensors.

The one mechanism behind the feedback-alignment family. Backprop sends the error at block `i`'s
output back to its input through the transpose of the block's own weight. Here block `i` is run
under a `vjp` in which the layer's *forward value* uses the weight `W` but its derivative with
respect to the block input uses a feedback tensor `B` of the same shape:

    a = layer(x; W, b) + layer(x - stop(x); B, 0)        value: layer(x; W, b)
                                                         d a / d x: the layer map with B
    h = post(activation(a))

`stop(x)` is the input closed over as a constant, so the second term is exactly zero forward and
contributes only its derivative. One `vjp` of this block with cotangent `g` at `h` then returns
the block's true local parameter gradient (`delta_a x^T` with `delta_a = g` pulled back through
`post` and the activation, evaluated at the true pre-activation) and the signal at the input,
`B^T delta_a` for a Linear layer, the transposed convolution with `B` for a Conv2d layer. Pooling
or any other parameter-free `post` is handled by the same `vjp`. With `B = W` this is backprop.

Three ways of routing the output error `e = dL/d(logits)` are built on it:

- `chained_feedback_gradients`: block by block from the output down, each block's input signal
  through its feedback tensor (feedback alignment, sign symmetry, Kolen-Pollack);
- `direct_feedback_gradients`: every hidden block receives `e` projected by a matrix straight to
  its output (direct feedback alignment);
- `indirect_feedback_gradients`: the first hidden block receives the projected error, which then
  travels forward through the forward weights to the later hidden blocks (indirect feedback
  alignment).

In all three the output block receives its true local gradient `e h^T`. Layers must be affine in
their input with `weight` as the only multiplicative parameter (Linear, Conv, ConvTranspose);
`check_feedback_network` says so clearly for anything else. `draw_feedback` draws random feedback
tensors from an explicit generator.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Mapping

import torch
import torch.func
from torch import nn
from torch.func import functional_call

from fa_rules.core.autodiff import grad_and_value, vjp
from fa_rules.core.errors import UserError
from fa_rules.core.metrics import classification_loss
from fa_rules.core.network import Network, Params

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
FEEDBACK_INITS = ("uniform", "gaussian", "xavier")

Pullback = Callable[[torch.Tensor], "tuple[Params, torch.Tensor | None]"]


# -- checks and random feedback -------------------------------------------------------------------
def check_feedback_network(network: Network, rule: str) -> None:
    """A clear error for networks the feedback mechanism cannot run on."""
    if len(network.heads):
        raise UserError(f"rule '{rule}' trains a classifier whose last block is the output; "
                        f"this network has heads ({', '.join(network.heads)})")
    for i, block in enumerate(network.blocks):
        if not isinstance(block.layer, AFFINE_LAYERS):
            raise UserError(f"rule '{rule}' needs Linear or convolution layers; block {i} has "
                            f"{type(block.layer).__name__}")


def weight_key(i: int) -> str:
    """Global key of block i's layer weight (the tensor a feedback tensor stands in for)."""
    return f"blocks.{i}.layer.weight"


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def draw_feedback(shape, init: str, scale: float, generator: torch.Generator,
                  like: torch.Tensor | None = None) -> torch.Tensor:
    """A random tensor of `shape` laid out like a weight `(out, in, *kernel)`, drawn on the CPU from
    `generator`, then moved to `like`'s device and dtype.

    `uniform`: U(-s/sqrt(fan_in), s/sqrt(fan_in)), the distribution of PyTorch's default Linear and
    Conv weights; `gaussian`: N(0, s^2/fan_in); `xavier`: U(+-s sqrt(6/(fan_in + fan_out))).
    """
    shape = tuple(int(d) for d in shape)
    fan_in, fan_out = _fans(shape)
    if init == "uniform":
        bound = scale / math.sqrt(fan_in)
        t = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    elif init == "gaussian":
        t = torch.randn(shape, generator=generator) * (scale / math.sqrt(fan_in))
    elif init == "xavier":
        bound = scale * math.sqrt(6.0 / (fan_in + fan_out))
        t = (torch.rand(shape, generator=generator) * 2 - 1) * bound
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


# -- one block -------------------------------------------------------------------------------------
def _sub(params: Params, prefix: str) -> Params:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def _reshape(block, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], *block.in_shape) if block.in_shape is not None else x


def _nonlinearity(block, local: Params, a: torch.Tensor) -> torch.Tensor:
    """`post(activation(a))`, the part of a block after its layer."""
    h = functional_call(block.activation, _sub(local, "activation"), (a,))
    return functional_call(block.post, _sub(local, "post"), (h,))


def _substituted_block(block, local: Params, x_in: torch.Tensor, x_const: torch.Tensor,
                       feedback: torch.Tensor) -> torch.Tensor:
    """The block's output, whose derivative with respect to `x_in` goes through `feedback`."""
    layer = _sub(local, "layer")
    x_const = _reshape(block, x_const)
    a = functional_call(block.layer, layer, (x_const,))
    # exactly zero forward; its x-derivative is the layer map with the feedback tensor
    shadow = {k: feedback if k == "weight" else torch.zeros_like(v) for k, v in layer.items()}
    a = a + functional_call(block.layer, shadow, (_reshape(block, x_in) - x_const,))
    return _nonlinearity(block, local, a)


def _globalize(network: Network, i: int, local_grads: Params) -> Params:
    return {k: local_grads[lk] for k, lk in network.block_keys[i].items()}


def block_pullback(network: Network, i: int, model_params: Params, x: torch.Tensor,
                   feedback: torch.Tensor | None = None, input_grad: bool = True):
    """Run block `i` on `x` under a `vjp`: returns `(h, pullback)`.

    `pullback(g)`, for a cotangent `g` at the block output `h`, returns `(grads, gx)`: `grads` is
    the block's true local parameter gradient (global keys) and `gx` the signal at `x`, sent
    through `feedback` in place of the layer weight (through the weight itself when `feedback` is
    None), or None when `input_grad` is False.
    """
    local = network.block_params(i, model_params)
    if not input_grad:
        h, fn = vjp(lambda p: network.block_apply_local(i, p, x), local)

        def pullback(g):
            (gp,) = fn(g)
            return _globalize(network, i, gp), None

        return h, pullback
    if feedback is None:
        h, fn = vjp(lambda p, xin: network.block_apply_local(i, p, xin), local, x)
    else:
        block = network.blocks[i]
        h, fn = vjp(lambda p, xin: _substituted_block(block, p, xin, x, feedback), local, x)

    def pullback(g):
        gp, gx = fn(g)
        return _globalize(network, i, gp), gx

    return h, pullback


def output_error(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(e, loss)`: the cross-entropy and its gradient with respect to the logits."""
    return grad_and_value(lambda z: classification_loss(z, y))(logits)


def _project(e: torch.Tensor, projection: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`projection @ e` for each example, shaped like a block output (`projection`: (numel, classes))."""
    return (e @ projection.T).reshape(e.shape[0], *shape)


# -- error routing ---------------------------------------------------------------------------------
def chained_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                               feedback: Mapping[int, torch.Tensor]):
    """`(grads, loss)` with the error sent down block by block; block `i >= 1` sends it to its input
    through `feedback[i]` (its own weight where `feedback` has no entry: backprop)."""
    pullbacks = []
    h = x
    for i in range(network.num_blocks):
        h, pb = block_pullback(network, i, model_params, h, feedback.get(i), input_grad=i > 0)
        pullbacks.append(pb)
    e, loss = output_error(h, y)
    grads: Params = {}
    g = e
    for pb in reversed(pullbacks):
        block_grads, g = pb(g)
        grads.update(block_grads)
    return grads, loss


def direct_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                              projections: Mapping[int, torch.Tensor]):
    """`(grads, loss)` where hidden block `i` receives `projections[i] @ e` at its output (a matrix
    of shape (block output numel, classes)); the output block receives `e`."""
    last = network.num_blocks - 1
    pullbacks, shapes = [], []
    h = x
    for i in range(network.num_blocks):
        h, pb = block_pullback(network, i, model_params, h, input_grad=False)
        pullbacks.append(pb)
        shapes.append(tuple(h.shape[1:]))
    e, loss = output_error(h, y)
    grads: Params = {}
    for i, pb in enumerate(pullbacks):
        g = e if i == last else _project(e, projections[i], shapes[i])
        grads.update(pb(g)[0])
    return grads, loss



@functools.cache
def _load_forward_ad() -> None:
    """torch's forward-mode AD imports its jvp decompositions on first use, and that import calls the
    deprecated `torch.jit.script`: a FutureWarning on every `ifa` run that is torch's, not the user's.
    Make the first use here with that one warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        torch.func.jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))


def _jvp(fn: Callable, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The directional derivative of `fn` at `primal` along `tangent` (forward mode)."""
    _load_forward_ad()
    return torch.func.jvp(fn, (primal,), (tangent,))[1]

def indirect_feedback_gradients(network: Network, model_params: Params, x: torch.Tensor, y: torch.Tensor,
                                projection: torch.Tensor):
    """`(grads, loss)`: the first hidden block receives `projection @ e` at its output; its
    pre-activation signal `delta_a_0` then travels forward along the forward path: for each later
    hidden block `delta_a_i = f'(a_i) * layer_i(t_{i-1}; W_i, no bias)`, where `t` is the signal
    carried through the block's `post` (pooling) as the activations are (`t = delta_a` without one).
    Each hidden layer's update is `delta_a_i x_i^T`; `post` parameters (batch norm) are not trained.
    The output block receives `e`."""
    last = network.num_blocks - 1
    inputs, pre, layer_pullbacks = [], [], []
    h = x
    for i in range(last):
        local = network.block_params(i, model_params)
        a, fn = vjp(lambda p, _i=i, _x=h: network.block_apply_local(_i, p, _x, pre_activation=True), local)
        inputs.append(h)
        pre.append(a)
        layer_pullbacks.append(fn)
        h = _nonlinearity(network.blocks[i], local, a)
    logits, out_pullback = block_pullback(network, last, model_params, h, input_grad=False)
    e, loss = output_error(logits, y)
    grads: Params = dict(out_pullback(e)[0])
    t = None
    for i in range(last):
        block = network.blocks[i]
        local = network.block_params(i, model_params)
        act = lambda a, _b=block, _l=local: functional_call(_b.activation, _sub(_l, "activation"), (a,))
        if i == 0:
            h0, nl_fn = vjp(lambda a: _nonlinearity(block, local, a), pre[0])
            (delta,) = nl_fn(_project(e, projection, tuple(h0.shape[1:])))
        else:
            shadow = {k: v if k == "weight" else torch.zeros_like(v) for k, v in _sub(local, "layer").items()}
            u = functional_call(block.layer, shadow, (_reshape(block, t),))
            delta = _jvp(act, pre[i], u)
        (gp,) = layer_pullbacks[i](delta)
        grads.update(_globalize(network, i, gp))
        post = lambda z, _b=block, _l=local: functional_call(_b.post, _sub(_l, "post"), (z,))
        t = _jvp(post, act(pre[i]), delta)
    return grads, loss
