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
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from fa_rules.core.autodiff import grad

INITS = ("zeros", "uniform", "normal")
SQUASHES = ("none", "sigmoid")


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
