"""Linear probe: how linearly separable a frozen encoder's latent makes the classes.

The standard yardstick for unsupervised rules (feature alignment, local feature alignment, VFA, a
backprop autoencoder): encode the training and test images with the frozen encoder, fit a
multinomial logistic regression (one Linear layer, cross-entropy plus a small L2 penalty, full-batch
L-BFGS from zero weights, features standardised with the training statistics) on the training
latents, and report its accuracy on the test latents. Deterministic: no random draws anywhere.
Probing an untrained encoder of the same architecture gives the floor.

Rule-agnostic: it needs only a network and its model parameters. The latent is the network's
output; for networks with heads it is the `mu` head when there is one (VAE-style encoders), else all
heads concatenated in name order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fa_rules.core.data import Dataset, as_float
from fa_rules.core.network import Network, Params

LATENT_HEAD = "mu"


@torch.no_grad()
def encode(network: Network, model_params: Params, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Flat latents `(N, D)` of the images `x` (uint8 or float), in batches."""
    device = next(iter(model_params.values())).device
    out = []
    for i in range(0, x.shape[0], batch_size):
        z = network.apply(model_params, as_float(x[i : i + batch_size].to(device)))
        if isinstance(z, dict):
            z = z[LATENT_HEAD] if LATENT_HEAD in z else torch.cat([z[k].flatten(1) for k in sorted(z)], 1)
        out.append(z.flatten(1).float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class ProbeResult:
    probe_accuracy: float
    probe_train_accuracy: float
    latent_dim: int

    def to_dict(self) -> dict:
        return {"probe_accuracy": self.probe_accuracy, "probe_train_accuracy": self.probe_train_accuracy,
                "latent_dim": self.latent_dim}


def fit_linear_probe(
    train_z: torch.Tensor,
    train_y: torch.Tensor,
    test_z: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-4,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit the logistic regression on (train_z, train_y); accuracy on both splits."""
    train_z, test_z = train_z.double(), test_z.double()
    mean, std = train_z.mean(0), train_z.std(0).clamp_min(1e-8)
    train_z, test_z = (train_z - mean) / std, (test_z - mean) / std
    weight = torch.zeros(num_classes, train_z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(train_z, weight, bias), train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        train_acc = (F.linear(train_z, weight, bias).argmax(1) == train_y).double().mean().item()
        test_acc = (F.linear(test_z, weight, bias).argmax(1) == test_y).double().mean().item()
    return ProbeResult(test_acc, train_acc, train_z.shape[1])


def linear_probe(network: Network, model_params: Params, dataset: Dataset, **options) -> ProbeResult:
    """Encode both splits of `dataset` with the frozen encoder and fit the probe."""
    if dataset.num_classes < 2:
        from fa_rules.core.errors import UserError

        raise UserError(f"dataset '{dataset.name}' has no class labels to probe")
    train_z = encode(network, model_params, dataset.train_x)
    test_z = encode(network, model_params, dataset.test_x)
    return fit_linear_probe(train_z, dataset.train_y.cpu(), test_z, dataset.test_y.cpu(), dataset.num_classes,
                            **options)
