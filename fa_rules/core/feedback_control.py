"""Network and controller dynamics of deep feedback control, simulated with Euler steps.

Meulemans, Farinha, García Ordóñez, Vilimelis Aceituno, Sacramento & Grewe (2021), "Credit
assignment in neural networks through deep feedback control", NeurIPS (arXiv 2106.07887). For a
chain of blocks with pre-activations `v_i` and rates `r_i = phi_i(v_i)` (`r_0 = x`; `i` counts
blocks from 0 here, so the output is block `L - 1` with `r_out = phi_out(v_out)`):

    tau_v dv_i/dt = -v_i + W_i r_{i-1} + b_i + v^fb_i           network, Eq. 1 (v^fb_i = Q_i u)
    e(t) = r_out^* - r_out(t)                                   output error, Eq. 3
    u(t) = u_int(t) + k_p e(t),  tau_u du_int/dt = e(t) - alpha u(t)   PI controller, Eq. 4

`r_out^*` is the output target (Eq. 2, computed by the caller). At a steady state `e = alpha u`
and `v_i = W_i r_{i-1} + b_i + Q_i u`, whatever `k_p`: the proportional gain only changes how fast
the loop gets there. Linearised around the feedforward pass with output Jacobian `J = d r_out / d v`
(all blocks stacked), the steady state is `u_ss = (J Q + alpha I)^{-1} delta` with
`delta = r_out^* - r_out^ff`, so `Delta v = Q u_ss`; for `Q = J^T M` and `alpha -> 0` this is the
minimum-norm (Gauss-Newton) change `J^T (J J^T)^{-1} delta` (the paper's Theorem 2 and Condition 2).

Discretisation (forward Euler, the scheme of the authors' code): each step first moves the
controller with the current error, then every block in order, each seeing the *new* rate of the
block below ("instantaneous transmission": one step carries a change from input to output, so the
loop does not wait one step per block). With `noise > 0` the feedback input has its own
compartment (the paper's apical compartment, feedback learning phase), an Euler-Maruyama step of
`tau_a dv^fb_i = (-v^fb_i + Q_i u) dt + noise dW`; the low-pass filtered noise is what the
controller then answers, and `-v^fb u^T` is the correlation the feedback learning rule follows.

Everything here is plain tensor arithmetic under `no_grad` (DFC needs no gradient); only Linear
blocks with no post modules are supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fa_rules.core.network import Network, Params


@dataclass(frozen=True)
class Dynamics:
    """Time constants, gains and step count of one simulation (time in units of `tau_u`'s clock)."""

    steps: int
    dt: float
    tau_v: float
    tau_u: float
    k_p: float
    alpha: float
    noise: float = 0.0
    tau_a: float = 1.0  # the feedback compartment's time constant (used only with noise)

    def check(self) -> "Dynamics":
        from fa_rules.core.errors import UserError

        if self.steps < 1:
            raise UserError(f"the dynamics need steps >= 1 (got {self.steps})")
        if not (self.dt > 0 and self.tau_v > 0 and self.tau_u > 0 and self.tau_a > 0):
            raise UserError("dt and the time constants must be > 0")
        if self.dt > self.tau_v or (self.noise > 0 and self.dt > self.tau_a):
            raise UserError(f"dt ({self.dt}) must not exceed tau_v ({self.tau_v}) or tau_a: forward Euler overshoots")
        if self.k_p < 0 or self.alpha < 0 or self.noise < 0:
            raise UserError("k_p, alpha and noise must be >= 0")
        return self


@dataclass
class SteadyState:
    """Where a simulation ended, and how far from a steady state."""

    v: list[torch.Tensor]  # pre-activations of every block
    inputs: list[torch.Tensor]  # each block's input rate r_{i-1} (flattened)
    u: torch.Tensor
    e: torch.Tensor
    e0: torch.Tensor  # the output error before control (delta)
    controller_residual: torch.Tensor  # ||e - alpha u|| / ||e0||: 0 at a steady state of Eq. 4
    network_residual: torch.Tensor  # ||v - (W r + b + Q u)|| / ||Q u||: 0 at a steady state of Eq. 1
    # time means over the simulation (for the trajectory-averaged update and the feedback rule)
    mean_update: list[torch.Tensor] | None = None
    mean_feedback_corr: list[torch.Tensor] | None = None


def check_network(network: Network, rule: str) -> None:
    from fa_rules.core.errors import UserError

    if len(network.heads):
        raise UserError(f"rule '{rule}' needs a plain chain of blocks (this network has heads)")
    for i, block in enumerate(network.blocks):
        if not isinstance(block.layer, nn.Linear) or not isinstance(block.post, nn.Identity):
            raise UserError(f"rule '{rule}' simulates Linear blocks without post modules; block {i} is not one")


def feedforward(network: Network, model: Params, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`(v, inputs)`: every block's pre-activation and (flattened) input rate in one forward pass."""
    v, inputs, r = [], [], x
    for i, block in enumerate(network.blocks):
        a = network.block_apply(i, model, r, pre_activation=True)
        inputs.append(r.reshape(r.shape[0], -1))
        v.append(a)
        r = block.activation(a)
    return v, inputs


DIFFERENCES = ("voltage", "rate")


def difference(activation: nn.Module, v: torch.Tensor, v_ff: torch.Tensor, kind: str) -> torch.Tensor:
    """The postsynaptic factor of the weight update: `v - v^ff` ("voltage", the paper's Eq. 5) or
    `phi(v) - phi(v^ff)` ("rate", the rule the authors' code runs by default; to first order it is
    `phi'(v) (v - v^ff)`, the voltage rule with the activation's derivative put in)."""
    if kind == "voltage":
        return v - v_ff
    if kind == "rate":
        return activation(v) - activation(v_ff)
    raise ValueError(f"difference must be one of {DIFFERENCES}, got {kind!r}")


def output_rate(network: Network, v_out: torch.Tensor) -> torch.Tensor:
    return network.blocks[-1].activation(v_out)


def weight_product_feedback(network: Network, model: Params) -> list[torch.Tensor]:
    """`Q_i = W_{i+1}^T ... W_{out}^T` and `Q_out = I`: the product of the transposed forward weights
    above each block, `J^T` of the network with its nonlinearities linearised away (the fixed
    feedback of the paper's "fixed" DFC variants)."""
    last = network.num_blocks - 1
    w_out = model[f"blocks.{last}.layer.weight"]
    q = torch.eye(w_out.shape[0], device=w_out.device, dtype=w_out.dtype)
    feedback = [q]
    for i in range(last, 0, -1):
        q = model[f"blocks.{i}.layer.weight"].T @ q
        feedback.append(q)
    return feedback[::-1]


def simulate(
    network: Network,
    model: Params,
    feedback: list[torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    d: Dynamics,
    generator: torch.Generator | None = None,
    accumulate_update: bool = False,
    accumulate_feedback: bool = False,
    kind: str = "voltage",
) -> SteadyState:
    """Run `d.steps` Euler steps of the controlled network from its feedforward state (u = 0).

    `feedback[i]` is `Q_i` (block output numel x output size); `target` is `r_out^*`. With
    `accumulate_update` the time mean of `difference(v_i, v_i^ff) r_{i-1}^T` is kept (`mean_update`,
    summed over the batch, the bias factor as a last column; `kind` as in `difference`), with `accumulate_feedback` the
    time mean of `v^fb_i u^T` (`sum_n`). Needs no graph; run it under `torch.no_grad()`.
    """
    v, inputs = feedforward(network, model, x)
    n = x.shape[0]
    e0 = target - output_rate(network, v[-1])
    u = torch.zeros_like(e0)
    u_int = torch.zeros_like(e0)
    v = [t.reshape(n, -1) for t in v]
    fb = [torch.zeros_like(t) for t in v]  # the feedback compartment (only stateful with noise)
    # the weight factor and, in the last column, the bias factor (a constant input of 1)
    sum_update = [t.new_zeros(t.shape[1], inp.shape[1] + 1) for t, inp in zip(v, inputs)] if accumulate_update else None
    sum_corr = [torch.zeros_like(q) for q in feedback] if accumulate_feedback else None
    rate_v, rate_u, rate_a = d.dt / d.tau_v, d.dt / d.tau_u, d.dt / d.tau_a
    noise_scale = d.noise * math.sqrt(d.dt) / d.tau_a
    weights = [(network.block_params(i, model)["layer.weight"], network.block_params(i, model).get("layer.bias"))
               for i in range(network.num_blocks)]
    activations = [b.activation for b in network.blocks]
    for _ in range(d.steps):
        e = target - output_rate(network, v[-1])
        u_int = u_int + rate_u * (e - d.alpha * u)  # Eq. 4, integral part (leak on u, as written there)
        u = u_int + d.k_p * e
        r = inputs[0]
        for i, (w, b) in enumerate(weights):
            ff = r @ w.T + (b if b is not None else 0.0)
            top_down = u @ feedback[i].T
            if d.noise > 0:
                fb[i] = fb[i] + rate_a * (top_down - fb[i]) + noise_scale * torch.randn(
                    fb[i].shape, generator=generator, device=fb[i].device, dtype=fb[i].dtype)
            else:
                fb[i] = top_down
            if accumulate_update:
                post = difference(activations[i], v[i], ff, kind)
                sum_update[i] = sum_update[i] + torch.cat([post.T @ r, post.sum(0)[:, None]], 1)
            if accumulate_feedback:
                sum_corr[i] = sum_corr[i] + fb[i].T @ u
            v[i] = v[i] + rate_v * (-v[i] + ff + fb[i])
            inputs[i] = r
            r = activations[i](v[i])
    e = target - output_rate(network, v[-1])
    # distance from the steady state, measured where the simulation stopped
    ff_now = [inputs[i] @ w.T + (b if b is not None else 0.0) for i, (w, b) in enumerate(weights)]
    top_down = [u @ q.T for q in feedback]
    gap = sum((vi - fi - ti).pow(2).sum() for vi, fi, ti in zip(v, ff_now, top_down))
    scale = sum(t.pow(2).sum() for t in top_down)
    tiny = torch.finfo(e.dtype).tiny
    return SteadyState(
        v=v, inputs=inputs, u=u, e=e, e0=e0,
        controller_residual=(e - d.alpha * u).norm() / e0.norm().clamp_min(tiny),
        network_residual=gap.sqrt() / scale.sqrt().clamp_min(tiny),
        mean_update=[s / d.steps for s in sum_update] if accumulate_update else None,
        mean_feedback_corr=[s / d.steps for s in sum_corr] if accumulate_feedback else None,
    )
