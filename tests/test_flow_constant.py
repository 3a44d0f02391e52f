"""Feature alignment's flow constant: c ||z_x - E(r)||^2 with c = 1/2 (appendix Eq. 11-13) or 1 (Algorithm 1)."""

import pytest
import torch
from torch import nn

from fa_rules.core import Network, UserError
from fa_rules.core.gradient_flow import gradient_flow
from fa_rules.core.network import Block
from fa_rules.plugins.manager import get_registry


def test_one_zero_start_step_is_2c_tau_wtw_x():
    w = torch.tensor([[0.9, -0.3, 0.2], [0.1, 1.2, -0.4]])
    x = torch.tensor([[0.5, -1.0, 2.0]])
    z = x @ w.T
    for constant, tau in ((0.5, 1.0), (1.0, 1.0), (1.0, 0.5)):
        r = gradient_flow(lambda r: r @ w.T, z, torch.zeros_like(x), 1, tau, constant=constant)
        assert torch.allclose(r, 2 * constant * tau * x @ w.T @ w, atol=1e-6), (constant, tau)


def test_algorithm_1_at_tau_1_is_the_appendix_flow_at_tau_2_and_diverges_at_the_clamp():
    """Scalar weight w = 1.3 (inside the clamp sqrt(2)): the appendix flow (c = 1/2, tau = 1) has
    factor 1 - w^2 = -0.69 per step and converges to x (Eq. 18-19); Algorithm 1's (c = 1) has
    1 - 2 w^2 = -2.38 and diverges."""
    w, x = torch.tensor([[1.3]]), torch.tensor([[0.7]])
    half = gradient_flow(lambda r: r @ w.T, x @ w.T, torch.zeros_like(x), 30, 1.0, constant=0.5)
    full = gradient_flow(lambda r: r @ w.T, x @ w.T, torch.zeros_like(x), 30, 1.0, constant=1.0)
    same = gradient_flow(lambda r: r @ w.T, x @ w.T, torch.zeros_like(x), 30, 2.0, constant=0.5)
    assert torch.allclose(half, x, atol=1e-4)
    assert torch.allclose(full, same) and full.abs().item() > 1e6


def test_feature_alignment_exposes_the_constant():
    spec = get_registry().rule("feature_alignment")
    assert spec.options["flow_constant"] == 0.5
    net = Network([Block(nn.Linear(3, 2, bias=False), in_shape=(3,))], in_shape=(3,))
    params = {"model": net.init_params()}
    x = torch.rand(4, 3)
    w = params["model"]["blocks.0.layer.weight"]
    for c in (0.5, 1.0):
        rule = spec.make(flow_constant=c, orthogonal=False, clamp_weights=False)
        r = rule.reconstruct(net, params, {}, x, torch.Generator().manual_seed(0))
        assert torch.allclose(r, 2 * c * x @ w.T @ w, atol=1e-6), c
    with pytest.raises(UserError, match="flow_constant"):
        spec.make(flow_constant=0.0)
