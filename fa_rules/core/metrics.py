"""Task losses and metrics shared by rules and the engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fa_rules.core.data import as_float
from fa_rules.core.network import Network
from fa_rules.core.rule import Batch, Groups, Rule


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: the loss every classifying rule is judged by."""
    return F.cross_entropy(logits, y)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield as_float(x[i : i + size]), y[i : i + size]


@torch.no_grad()
def evaluate_classifier(network: Network, params: Groups, x, y, batch_size: int = 1000) -> dict:
    correct, loss_sum = 0, 0.0
    for xb, yb in _chunks(x, y, batch_size):
        logits = network.apply(params["model"], xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    n = x.shape[0]
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n}


@torch.no_grad()
def evaluate_reconstruction(
    rule: Rule, network: Network, params: Groups, state, x, seed: int, batch_size: int = 500
) -> dict:
    """Mean squared error per pixel between test images and the rule's reconstructions."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    sq, count = 0.0, 0
    for xb, _ in _chunks(x, x, batch_size):
        with torch.enable_grad():  # reconstruction may run a gradient flow
            recon = rule.reconstruct(network, params, state, xb, generator)
        sq += (recon.detach() - xb).pow(2).sum().item()
        count += xb.numel()
    return {"test_recon_mse": sq / count}


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors seen as flat vectors (90 for a zero vector)."""
    a, b = a.flatten().double(), b.flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 90.0
    cos = (a @ b / denom).clamp(-1.0, 1.0)
    return float(torch.rad2deg(torch.arccos(cos)))


def backprop_gradient(network: Network, model_params: dict, batch: Batch) -> dict:
    """The exact gradient of the classification loss: the reference for alignment angles."""
    from fa_rules.core.autodiff import grad

    return grad(lambda p: classification_loss(network.apply(p, batch.x), batch.y))(model_params)


def alignment_angles(rule: Rule, network: Network, params: Groups, state, batch: Batch) -> list[float]:
    """Per parametrised block, the angle (degrees) between the rule's model update and the backprop
    gradient on the same batch (all of the block's parameters as one vector). Heads come last. Both
    draw the same dropout masks (the global generators seeded from the batch before each)."""
    batch.seed_global_generators()
    updates, _, _ = rule.step(network, params, state, batch)
    batch.seed_global_generators()
    reference = backprop_gradient(network, params["model"], batch)
    groups = [list(k) for k in network.block_keys] + [list(k) for k in network.head_keys.values()]
    angles = []
    for keys in groups:
        if not keys:
            continue
        u = torch.cat([updates["model"][k].flatten() for k in keys])
        g = torch.cat([reference[k].flatten() for k in keys])
        angles.append(angle_deg(u, g))
    return angles
