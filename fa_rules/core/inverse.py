"""Layer values, block encoders and feedback decoders for rules that propagate targets.

Rules of the target-propagation family see a network as a chain `h_0 = x -> h_1 -> ... -> h_L`
of per-block values with encoders `h_l = f_l(h_{l-1})`, and give every block a learned feedback
function (decoder) `g_l: h_l -> h_{l-1}` that approximately inverts it. Two coordinate systems
("spaces") for the values are supported:

- `"post"`: `h_l` is block l's output, `f_l(h) = sigma_l(W_l h + b_l)` (the form of Lee et al.
  2015, difference target propagation). The decoder mirrors the block and ends in the activation
  of the block below, so reconstructions live where `h_{l-1}` lives:
  `g_l(h) = sigma_{l-1}(V_l h + c_l)` (no activation when the block below is the input).
- `"pre"`: `h_l` is block l's pre-activation, `f_l(h) = W_l sigma_{l-1}(h) + b_l` (the form
  `f_l(h_{l-1}) = W sigma(h_{l-1})` of Bengio 2020, "Deriving differential target propagation
  from iterating approximate inverses"). The decoder mirrors that form:
  `g_l(h) = V_l sigma_l(h) + c_l`.

A decoder is built from the block's layer type: `Linear(in, out)` gives a `Linear(out, in)` map,
`Conv2d(c_in, c_out, k, s, p)` a `ConvTranspose2d(c_out, c_in, k, s, p)` whose output padding
restores the block's input size exactly. Convolutional networks (Ernoult et al. 2022, "Towards
scaling difference target propagation by learning backprop targets", ICML, whose feedback network
is the forward network's layers in reverse order, each replaced by its transpose):

- a `MaxPool2d` post is inverted by max-unpooling with the indices of the forward pass that
  produced the value being decoded (`forward_pass` and `encode(..., with_indices=True)` return
  them: the pool is recomputed with `return_indices=True` from the pre-pool value, the same
  numbers as the block's own forward);
- the flatten between the last convolution and the first Linear block is inverted by a reshape
  (every decoder reshapes its output to the value shape below it);
- a conv block's decoder in the "post" space has one of two forms (`CONV_DECODERS`):
  `"reversed_block"` (Ernoult et al.'s): `g_l(h) = V_l * sigma_l(unpool(h)) + c_l`, the block's
  own activation between the unpooling and the transposed convolution and no activation at the
  output, so that `J_g` has the structure `W^T diag(sigma') P^T` of the block's `J_f^T`; or
  `"activation_below"`: `g_l(h) = sigma_{l-1}(V_l * unpool(h) + c_l)`, the form of the dense
  decoders above.

Other post modules (batch norm) are refused: a mirrored layer cannot undo them; so are pools in the
"pre" space (a pre-activation below a pool would need the indices of the block below). Decoder
parameters are plain tensors (`{"weight", "bias"}`) the caller owns; `Decoder` only says how to
initialise and apply them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fa_rules.core.network import Network, Params, max_pool_with_indices

SPACES = ("post", "pre")
CONV_DECODERS = ("reversed_block", "activation_below")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def activate(network: Network, i: int, a: torch.Tensor) -> torch.Tensor:
    """Block i's activation (then its post module) applied to a pre-activation value."""
    block = network.blocks[i]
    return block.post(block.activation(a))


def activate_with_indices(network: Network, i: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`activate`, and the argmax indices of block i's max pool (None for a block without one).
    The pool is recomputed with `return_indices=True`: the same values as the block's forward."""
    block = network.blocks[i]
    z = block.activation(a)
    if isinstance(block.post, nn.MaxPool2d):
        return max_pool_with_indices(block.post, z)
    return block.post(z), None


def forward_pass(network: Network, params: Params, x: torch.Tensor, space: str):
    """`([h_0 = x, h_1, ..., h_L], [None, idx_1, ..., idx_L])`: the values of `forward_values` and,
    aligned with them, the max-pool indices of the block that produced each value (None where the
    block has no max pool): max-unpooling in a decoder needs them."""
    _check_space(space)
    values, indices, z = [x], [None], x
    for i in range(network.num_blocks):
        a = network.block_apply(i, params, z, pre_activation=True)
        z, idx = activate_with_indices(network, i, a)
        values.append(a if space == "pre" else z)
        indices.append(idx)
    return values, indices


def forward_values(network: Network, params: Params, x: torch.Tensor, space: str) -> list[torch.Tensor]:
    """`[h_0 = x, h_1, ..., h_L]` in `space` for one forward pass (the last block's value is the
    network output in both spaces when its activation is the identity)."""
    return forward_pass(network, params, x, space)[0]


def encode(network: Network, i: int, params: Params, h: torch.Tensor, space: str, with_indices: bool = False):
    """`f_i`: block i's map from the value below it (h_{i}, in the list of `forward_values`, index
    i) to its own value (index i + 1). `params` may hold only this block's entries. With
    `with_indices`, `(value, max-pool indices or None)`: decoding the value unpools with them."""
    _check_space(space)
    if space == "post" and not with_indices:
        return network.block_apply(i, params, h)
    if space == "post":
        return activate_with_indices(network, i, network.block_apply(i, params, h, pre_activation=True))
    z = h if i == 0 else activate(network, i - 1, h)
    a = network.block_apply(i, params, z, pre_activation=True)
    return (a, None) if with_indices else a


def value_shapes(network: Network) -> list[tuple[int, ...]]:
    """Per-example shapes of `h_0, ..., h_L` (the same in both spaces for blocks without `post`)."""
    first = network.blocks[0]
    if network.in_shape:
        in_shape = tuple(network.in_shape)
    elif first.in_shape is not None:
        in_shape = first.in_shape
    elif isinstance(first.layer, nn.Linear):
        in_shape = (first.layer.in_features,)
    else:
        raise ValueError("cannot tell the network's input shape (give Network an in_shape)")
    try:
        reference = next(network.parameters())
        device, dtype = reference.device, reference.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    shapes = [in_shape]
    with torch.no_grad():
        z = torch.zeros(1, *in_shape, device=device, dtype=dtype)
        for block in network.blocks:
            z = block(z)
            shapes.append(tuple(z.shape[1:]))
    return shapes


@dataclass(frozen=True)
class Decoder:
    """How to initialise and apply the feedback function `g_i` of block i (see module docstring):
    `out_activation(layer(in_activation(unpool(h))))`, reshaped to the value shape below."""

    kind: str  # "linear" or "conv_transpose"
    in_features: int  # decoder input channels (linear: features)
    out_features: int  # decoder output channels (linear: features)
    out_shape: tuple[int, ...]  # per-example shape of the decoder output (the value h_{i-1})
    in_activation: nn.Module
    out_activation: nn.Module
    bias: bool = True
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    output_padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    # max-unpooling first: (kernel, stride, padding) of the block's pool and the pre-pool size
    unpool: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    unpool_size: tuple[int, int] | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features, *self.kernel_size)

    def init(self, generator: torch.Generator, device=None, dtype=torch.float32) -> Params:
        """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases (PyTorch's default scale),
        drawn from the CPU `generator` and then moved to `device`."""
        fan_in = self.in_features * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        weight = (torch.rand(self.weight_shape, generator=generator, dtype=dtype) * 2 - 1) * bound
        out = {"weight": weight.to(device)}
        if self.bias:
            out["bias"] = ((torch.rand(self.out_features, generator=generator, dtype=dtype) * 2 - 1) * bound).to(device)
        return out

    def layer_input(self, h: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """What the decoder's layer sees: `in_activation(unpool(h))`."""
        if self.unpool is not None:
            if indices is None:
                raise ValueError("this decoder unpools: it needs the max-pool indices of the forward pass")
            k, s, p = self.unpool
            h = F.max_unpool2d(h, indices, k, s, p, output_size=self.unpool_size)
        return self.in_activation(h)

    def __call__(self, params: Params, h: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        z = self.layer_input(h, indices)
        if self.kind == "linear":
            y = F.linear(z.reshape(z.shape[0], -1), params["weight"], params.get("bias"))
        else:
            y = F.conv_transpose2d(
                z, params["weight"], params.get("bias"), self.stride, self.padding, self.output_padding,
                1, self.dilation,
            )
        return self.out_activation(y.reshape(y.shape[0], *self.out_shape))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_post(network: Network, j: int, space: str) -> None:
    """Block j's post module must be invertible by the decoders: none, or (in the "post" space)
    a max pool without dilation, which max-unpooling with the forward's indices inverts."""
    post = network.blocks[j].post
    if isinstance(post, nn.Identity):
        return
    if isinstance(post, nn.MaxPool2d) and space == "post":
        if _pair(post.dilation) != (1, 1):
            raise ValueError(f"block {j}: a dilated max pool cannot be max-unpooled")
        return
    if isinstance(post, nn.MaxPool2d):
        raise ValueError(f"block {j} pools: its decoders need space=post (a pre-activation below a pool "
                         "has no unpooling indices)")
    raise ValueError(
        f"block {j} has a post module ({type(post).__name__}); a mirrored layer cannot invert it "
        "(build the model without it, e.g. batch_norm=false)"
    )


def decoder_for(network: Network, i: int, space: str, shapes: list[tuple[int, ...]] | None = None,
                conv_decoder: str = "reversed_block") -> Decoder:
    """The decoder `g_i` mapping block i's value back to the value below it (block i - 1's, or the
    input for i = 0). `conv_decoder` picks the form of a conv block's decoder in the "post" space
    (`CONV_DECODERS`, module docstring). Raises ValueError for blocks it cannot mirror."""
    _check_space(space)
    if conv_decoder not in CONV_DECODERS:
        raise ValueError(f"conv_decoder must be one of {CONV_DECODERS}, got {conv_decoder!r}")
    network.require_layered("an invertible block with a layer to mirror as its decoder", blocks=(i - 1, i))
    block = network.blocks[i]
    for j in (i - 1, i):
        if j >= 0:
            _check_post(network, j, space)
    if isinstance(block.post, nn.MaxPool2d) and not isinstance(block.layer, nn.Conv2d):
        raise ValueError(f"block {i}: only a convolution's max pool can be unpooled")
    shapes = shapes or value_shapes(network)
    identity = nn.Identity()
    below = network.blocks[i - 1].activation if i > 0 else identity
    if space == "post":
        in_act, out_act = identity, below
    else:
        in_act, out_act = block.activation, identity
    layer = block.layer
    if isinstance(layer, nn.Linear):
        return Decoder(
            "linear", layer.out_features, layer.in_features, shapes[i], in_act, out_act, bias=True,
        )
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError(f"block {i}: only Conv2d with groups=1 and numeric zero padding can be mirrored")
        k, s, p, d = (_pair(v) for v in (layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        in_hw = shapes[i][1:]
        out_hw = tuple(_conv_out(in_hw[a], k[a], s[a], p[a], d[a]) for a in range(2))  # before any pool
        output_padding = tuple(
            in_hw[a] - ((out_hw[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + 1) for a in range(2)
        )
        if any(op < 0 or op >= max(s[a], d[a]) for a, op in enumerate(output_padding)):
            raise ValueError(f"block {i}: no transposed convolution restores the input size {tuple(in_hw)}")
        unpool = None
        if isinstance(block.post, nn.MaxPool2d):
            pool = block.post
            unpool = (_pair(pool.kernel_size), _pair(pool.stride if pool.stride is not None else pool.kernel_size),
                      _pair(pool.padding))
        if space == "post" and conv_decoder == "reversed_block":
            in_act, out_act = block.activation, identity
        return Decoder(
            "conv_transpose", layer.out_channels, layer.in_channels, shapes[i], in_act, out_act, bias=True,
            kernel_size=k, stride=s, padding=p, output_padding=output_padding, dilation=d,
            unpool=unpool, unpool_size=out_hw if unpool is not None else None,
        )
    raise ValueError(f"block {i}: no decoder for layer type {type(layer).__name__} (Linear and Conv2d only)")
