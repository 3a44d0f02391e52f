"""The inner gradient flow of feature alignment, shared by every rule built on it.

Feature alignment (Farias & Maziero, "Feature alignment as a generative process", Frontiers in
Artificial Intelligence 2023) recovers an input from a representation by descending a distance in
input space, starting from a random (or zero) input r:

    Eq. (1)  dr/dt = -dL/dr,        L = 1/2 ||z - f(r)||^2
    Eq. (2)  r_t = r_{t-1} - tau * dL/dr   (T Euler steps; r_hat = r_T)

`f` is any map (a whole encoder for Algorithm 1, one block for the local rule of Algorithm 2 and the
block-wise reconstruction of Algorithm 3) and `z` its target output. The flow is written with
`fa_rules.core.grad`, so a caller that differentiates a loss of `r_hat` with respect to parameters
`f` closes over gets the second-order gradient through all T steps (how feature alignment trains),
and the saved-tensor memory probe sees the whole graph.

Conventions, kept identical across rules so that their numbers compare:

- the inner distance is 1/2 of the squared error summed over every element (each example's r only
  moves with its own error, whatever the batch size; with tau = 1 and T = 1 a linear map W from a
  zero start gives r_hat = W^T W x, the case analysed in the paper's Appendix A);
- `z` is not detached: the outer gradient also flows through the target, as in the appendix's
  convergence analysis (Eq. 20-22) and the authors' code;
- the outer reconstruction loss is the mean squared error per element (`reconstruction_loss`), the
  same quantity the engine reports as `test_recon_mse`.

Helpers for the rest of the recipe live here too: the start distribution of r (`initial_input`),
optional squashing of r_hat into the data range (`squash`) and orthogonal initialisation of the
weights (section 4 of the paper).

Convolutional encoders. Through a convolution the flow's step is its transpose: for `f(r) = W * r + b`,
`d/dr 1/2 ||z - f(r)||^2 = -W^T * (z - f(r))`, the transposed convolution (`conv_transpose2d`) of the
error; autodiff gives exactly that. The paper's encoders down-sample by stride 2 and have no pooling
(section 4, Tables 7-9), so it is silent on max pooling; where a flow passes one, `pool_positions`
says where the pool takes its maxima:

- `data` (the default): at the positions where the data's own forward pass had them. The flow's step
  then carries the error back by max-unpooling with the indices of that forward pass, as Ernoult et
  al. 2022 (scalingDTP) invert max pooling; at the data itself the pool's value is unchanged.
- `flow`: torch's max pool of the flow's current point, as written. From a zero start every window
  ties and the first step writes only to each window's first position.

`forward_with_indices` finds the data's positions in its forward pass, `encode` applies a network with them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten

from fa_rules.core.autodiff import grad

INITS = ("zeros", "uniform", "normal")
SQUASHES = ("none", "sigmoid")
POOL_POSITIONS = ("data", "flow")
UNPOOLS = ("nearest", "indices")  # a pooled map carried back to the pool's input outside any flow


def initial_input(init: str, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The start r_0 of the flow, shaped like `like`: zeros, uniform on [0, 1) or standard normal.

    Random starts draw from `generator` only (the rule's per-step generator), so steps stay pure.
    """
    if init == "zeros":
        return torch.zeros_like(like)
    if init == "uniform":
        return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if init == "normal":
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    raise ValueError(f"unknown init '{init}' (use {', '.join(INITS)})")


def squash(name: str, r: torch.Tensor) -> torch.Tensor:
    """Map r_hat into the data range: `none` (the paper) or `sigmoid` (the authors' code)."""
    if name == "none":
        return r
    if name == "sigmoid":
        return torch.sigmoid(r)
    raise ValueError(f"unknown squash '{name}' (use {', '.join(SQUASHES)})")


def alignment_distance(target: Any, output: Any, weight: Any = None) -> torch.Tensor:
    """1/2 sum of squared differences over every leaf of (possibly dict-valued) outputs.

    `weight` (same structure, or one tensor broadcasting against a tensor output) weights the
    squared errors elementwise: e.g. Eq. (3) of the paper, ||l_x - l_r||^2 + alpha ||f_x - f_r||^2,
    is `weight = tensor([alpha, 1])` on an output `[f, l]`.
    """
    targets, _ = tree_flatten(target)
    outputs, _ = tree_flatten(output)
    weights = tree_flatten(weight)[0] if weight is not None else [None] * len(targets)
    if len(targets) != len(outputs) or len(weights) != len(targets):
        raise ValueError("target, output and weight of the alignment distance differ in structure")
    total = 0.0
    for t, o, w in zip(targets, outputs, weights):
        sq = (t - o).pow(2)
        total = total + 0.5 * (sq * w if w is not None else sq).sum()
    return total


def gradient_flow(
    f: Callable[[torch.Tensor], Any],
    target: Any,
    r0: torch.Tensor,
    steps: int = 1,
    step_size: float = 1.0,
    weight: Any = None,
    constant: float = 0.5,
) -> torch.Tensor:
    """`steps` Euler steps r <- r - step_size * d/dr [c ||target - f(r)||^2] from `r0` (Eq. 2), with
    `c = constant`: 1/2 as in the appendix (Eq. 11-13, the default), 1 as Algorithm 1 prints it.
    At the same step size the two flows differ by a factor 2 in every step (c = 1 at tau equals
    c = 1/2 at 2 tau); the paper's tau = 1 and its stability bound w^2 < 2 (Eq. 9, 19) belong to
    c = 1/2: one step from zero gives r = 2 c tau W^T W x, the Appendix A case for c = 1/2.

    Differentiable in everything `f` and `target` depend on (call it inside `fa_rules.core.grad`
    to train through the flow). Outside any transform it simply returns r_hat.
    """

    def distance(r):
        return alignment_distance(target, f(r), weight)

    step = grad(distance)
    size = step_size * constant / 0.5  # `distance` carries the 1/2
    r = r0
    for _ in range(steps):
        r = r - size * step(r)
    return r


def reconstruction_loss(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """C = ||x - r_hat||^2 (Algorithm 1, line 12), as a mean over elements."""
    return (x - r_hat.reshape(x.shape)).pow(2).mean()


def orthogonal_init(params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of `params` with every weight of two or more dimensions orthogonally initialised.

    Section 4 of the paper (after Saxe et al. 2014): conv kernels are orthogonal as `(out, in * k * k)`
    matrices. Biases and one-dimensional parameters are copied unchanged.
    """
    out = {}
    for key, value in params.items():
        if value.ndim >= 2 and key.endswith("weight"):
            w = torch.empty(value.shape, dtype=value.dtype)
            torch.nn.init.orthogonal_(w, generator=generator)
            out[key] = w.to(value.device)
        else:
            out[key] = value.detach().clone()
    return out


# -- max pooling inside the flow (convolutional encoders) ----------------------------------------------
def max_pool_indices(pool: nn.MaxPool2d, a: torch.Tensor) -> torch.Tensor:
    """Where `pool` takes its maxima on `a`: flat positions within each (example, channel) plane, as
    `F.max_pool2d(..., return_indices=True)` gives them (integers: nothing to differentiate)."""
    from fa_rules.core.network import max_pool_with_indices

    return max_pool_with_indices(pool, a.detach())[1]


def pool_at(a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The max pool evaluated at fixed positions: `a`'s values at `indices`. Linear in `a`; its
    transpose (what a flow's step sends back through it) is max-unpooling with the same indices."""
    return a.flatten(2).gather(2, indices.flatten(2)).reshape(indices.shape)


def unpool(h: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Max-unpooling: each value of `h` put back at its position in `indices` of a zero map shaped like
    `like` (where overlapping windows share a position, their mean)."""
    out = torch.zeros(like.shape[:2] + (like[0, 0].numel(),), dtype=h.dtype, device=h.device)
    out = out.scatter_reduce(2, indices.flatten(2), h.flatten(2), reduce="mean", include_self=False)
    return out.reshape(like.shape)


def upsample_nearest(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Each pooled value copied over its window: nearest-neighbour upsampling of `h` to `like`'s size
    (exactly the windows of a pool whose kernel equals its stride)."""
    return F.interpolate(h, size=like.shape[-2:], mode="nearest")


def max_pool_post(network, i: int) -> nn.MaxPool2d | None:
    """Block i's max pool, where the block is `layer -> activation -> MaxPool2d` (else None)."""
    from fa_rules.core.network import Block

    block = network.blocks[i]
    if isinstance(block, Block) and isinstance(block.post, nn.MaxPool2d):
        return block.post
    return None


def block_with_indices(network, i: int, params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block i's output for the data `x` and the indices of its max pool on it (None without one);
    differentiable as the block itself (the indices are integers)."""
    pool = max_pool_post(network, i)
    if pool is None:
        return network.block_apply(i, params, x), None
    a = network.blocks[i].activation(network.block_apply(i, params, x, pre_activation=True))
    indices = max_pool_indices(pool, a)
    return pool_at(a, indices), indices


def forward_with_indices(network, params, x: torch.Tensor):
    """`(output, indices)`: the network's output for the data `x` and, per block, the indices of its
    max pool on this pass (None for a block without one), in one differentiable pass."""
    indices = [max_pool_post(network, i) for i in range(network.num_blocks)]
    if all(pool is None for pool in indices):
        return network.apply(params, x), indices
    h = x
    for i in range(network.num_blocks):
        h, indices[i] = block_with_indices(network, i, params, h)
    return network.output_apply(params, h), indices


def block_at(network, i: int, params, r: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """Block i applied to `r`, its max pool (if any) taken at `indices` (None: the block as it is)."""
    if indices is None:
        return network.block_apply(i, params, r)
    return pool_at(network.blocks[i].activation(network.block_apply(i, params, r, pre_activation=True)), indices)


def encode(network, params, r: torch.Tensor, indices: list | None):
    """The network's output for `r`, every max pool taken at `indices` (from `forward_with_indices`); with
    `indices` None or without a pooled block, `network.apply` itself."""
    if indices is None or all(ix is None for ix in indices):
        return network.apply(params, r)
    h = r
    for i in range(network.num_blocks):
        h = block_at(network, i, params, h, indices[i])
    return network.output_apply(params, h)
