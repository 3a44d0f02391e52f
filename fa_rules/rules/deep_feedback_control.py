"""Deep feedback control: `dfc`.

Meulemans, Farinha, García Ordóñez, Vilimelis Aceituno, Sacramento & Grewe (2021), "Credit
assignment in neural networks through deep feedback control", NeurIPS (arXiv 2106.07887). Equation
numbers are the paper's; the dynamics themselves live in `fa_rules.core.feedback_control`.

A step:

1. Output target (Eq. 2): `r_out^* = r_out^ff - lambda dl/dr_out` with `l` the per-example
   cross-entropy of the output block's rate (the logits of our MLPs) and `lambda` the
   `target_stepsize`.
2. Controlled dynamics (Eq. 1, 3, 4): `steps` Euler steps of size `dt` of the network
   (`tau_v`) and the PI controller (`tau_u`, gains `k_p` and `alpha`) from the feedforward state;
   the controller's signal `u` reaches every block `i` (the output block too) through `Q_i`.
3. Forward weights (Eq. 5 at the steady state, the paper's DFC-SS): for every block,
   `Delta W_i = (v_i,ss - v^ff_i,ss) r_{i-1,ss}^T` with `v^ff_i = W_i r_{i-1} + b_i` the feedforward
   (basal) part given the *controlled* rate below; the bias gets `v_i,ss - v^ff_i,ss`. No gradient
   is taken. The pseudo-gradient handed to the optimiser is `-Delta W / (lambda N)` summed over the
   batch (the `1 / lambda` makes it gradient-sized: lambda only sets how far the target reaches).
   `update=trajectory` averages the same product over every simulated step instead (Eq. 5
   integrated in time, what the authors' code runs as "DFC"; the paper's DFC-SS is the default).
4. Feedback weights `Q` (`feedback`):
   - `fixed`: `Q_i = W_{i+1}^T ... W_out^T`, `Q_out = I`, from the initial forward weights and
     kept (in the rule's state): the paper's fixed-feedback variants ("DFC (fixed)"), which equal
     `J^T` (Condition 2) for a linear network at initialisation. The default: on digits it reached
     0.958 (learned: 0.947, with a late loss jump) at half the cost.
   - `learned`: the parameter group `feedback`, optimised by the engine. Each step first
     runs the feedback learning phase (sec. 5): `feedback_steps` Euler steps with white noise of
     scale `feedback_noise` in the feedback compartment (time constant `feedback_tau_a`), output
     target = the feedforward output (the controller only fights the noise), its own leak
     `feedback_alpha` and gain `feedback_k_p`; then `Delta Q_i = -(1/sigma^2) <v^fb_i u^T> - beta Q_i`
     (Eq. 13: time and batch mean; `beta` = `feedback_decay`). Linearised, the noise drives `Q`
     towards `J^T (J J^T + gamma I)^{-1}` up to scale, which satisfies Condition 2. `Q` starts from
     the weight product above (`feedback_init=product`), standing in for the paper's feedback
     pre-training epochs, or random (`feedback_init=random`, Xavier-uniform-like).
5. `difference=voltage` is Eq. 5 (`v - v^ff`); `difference=rate` is `phi(v) - phi(v^ff)`, the
   rule the authors' code runs in its configurations (it adds the activation's derivative to first
   order).

Metrics per step: `loss` (cross-entropy of the feedforward output), and how far the dynamics ended
from a steady state: `controller_residual` (`||e - alpha u|| / ||e_0||`, 0 at a steady state of
Eq. 4), `network_residual` (`||v - W r - b - Q u|| / ||Q u||`, Eq. 1), their maximum
`steady_state_residual`, and `output_error_ratio` (`||e|| / ||e_0||`: how much of the output target
the controller reached; about `alpha ||u|| / ||e_0||` at the steady state). A run whose
`train_steady_state_residual` is not small stopped short of the steady state the update assumes:
raise `steps` or `dt`.

Defaults (`steps=40, dt=0.1, tau_v=0.1, tau_u=1, k_p=0, alpha=0.01, target_stepsize=0.1`) are
chosen so the dynamics end at a steady state on our MLPs (digits: `train_steady_state_residual`
about 3e-4). `dt = tau_v` makes each Euler step settle the network given `u` (forward Euler with
rate 1), which is allowed and stable; the network then answers the controller within the step,
and a proportional gain only slows the integral part (the loop's rate is `(mu + alpha) / (1 + k_p
mu)` for an eigenvalue `mu` of `J Q`; measured on digits after 3 epochs with 80 steps of 0.05:
residual 3e-4 with `k_p = 0`, 1e-2 with `k_p = 0.5`); `k_p = 2` with `dt = tau_v` oscillates and
diverges, which the residual metrics show at once.

Cost: each step simulates `steps` Euler steps (default 40), each a full forward pass plus one
`L x n_out` feedback product per block, and the learned variant as many again with noise:
roughly `steps` (fixed) or `steps + feedback_steps` (learned) forward passes per training step.
Supports MLPs only (Linear blocks, no heads): the paper defines the network dynamics, the controller
and the feedback weights `Q_i` on fully connected layers, and its code (`DFCLayer`, "any feedforward
fully connected neural network architecture" in its README) builds no other; even its CIFAR-10 runs
flatten the image into an MLP. A convolutional model is refused in one line that says so
(`FULLY_CONNECTED_ONLY`), before any run directory exists.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fa_rules.core import Rule, RuleSpec, UserError, classification_loss, grad, hookimpl
from fa_rules.core.rule import MAX_ITERATIONS, NON_NEGATIVE, POSITIVE, Range
from fa_rules.core.feedback_control import (
    DIFFERENCES,
    Dynamics,
    check_network,
    difference,
    output_rate,
    simulate,
    weight_product_feedback,
)

FEEDBACKS = ("learned", "fixed")
FEEDBACK_INITS = ("product", "random")
UPDATES = ("steady_state", "trajectory")


@dataclass(frozen=True)
class Settings:
    target_stepsize: float
    forward: Dynamics
    feedback_phase: Dynamics
    feedback: str
    feedback_init: str
    feedback_decay: float
    difference: str
    update: str

    def check(self) -> "Settings":
        """What depends on several settings (each one's range is declared in `RANGES`)."""
        self.forward.check()
        if self.feedback == "learned":
            self.feedback_phase.check()
            if not self.feedback_phase.noise > 0:
                raise UserError("learned feedback needs feedback_noise > 0 (the noise is what it learns from)")
        return self


# every setting's declared range (checked by the registered spec, `RuleSpec.check_options`)
STEPS = Range(1, MAX_ITERATIONS)  # Euler steps per training step
RANGES = {
    "steps": STEPS, "dt": POSITIVE, "tau_v": POSITIVE, "tau_u": POSITIVE, "k_p": NON_NEGATIVE,
    "alpha": NON_NEGATIVE, "target_stepsize": POSITIVE, "feedback": FEEDBACKS, "feedback_init": FEEDBACK_INITS,
    "difference": DIFFERENCES, "update": UPDATES, "feedback_steps": STEPS, "feedback_dt": POSITIVE,
    "feedback_noise": NON_NEGATIVE, "feedback_alpha": NON_NEGATIVE, "feedback_k_p": NON_NEGATIVE,
    "feedback_tau_a": POSITIVE, "feedback_decay": NON_NEGATIVE,
}


def output_target(network, v_out: torch.Tensor, y: torch.Tensor, stepsize: float) -> torch.Tensor:
    """Eq. 2: `r^* = r - lambda dl/dr` per example (l: cross-entropy of the output rate)."""
    r = output_rate(network, v_out)
    per_example = grad(lambda out: classification_loss(out, y) * out.shape[0])(r)
    return r - stepsize * per_example


def feedback_keys(network) -> list[str]:
    return [f"blocks.{i}" for i in range(network.num_blocks)]


def forward_updates(network, model, ss, s: Settings) -> dict:
    """`-(1/(lambda N)) sum_n Delta W`: Eq. 5 at the steady state (or its time mean)."""
    n = ss.u.shape[0]
    updates = {}
    for i in range(network.num_blocks):
        params = network.block_params(i, model)
        w, b = params["layer.weight"], params.get("layer.bias")
        if s.update == "trajectory":
            both = ss.mean_update[i]
            dw, db = both[:, :-1], both[:, -1]
        else:
            r = ss.inputs[i]
            ff = r @ w.T + (b if b is not None else 0.0)
            post = difference(network.blocks[i].activation, ss.v[i], ff, s.difference)
            dw, db = post.T @ r, post.sum(0)
        scale = -1.0 / (s.target_stepsize * n)
        updates[f"blocks.{i}.layer.weight"] = (scale * dw).reshape(w.shape)
        if b is not None:
            updates[f"blocks.{i}.layer.bias"] = scale * db
    return {k: updates[k] for k in model}


def feedback_updates(network, model, feedback, x, s: Settings, generator) -> tuple[dict, dict]:
    """The feedback learning phase: pseudo-gradient `-Delta Q` of Eq. 13, and the phase's residuals."""
    with torch.no_grad():
        d = s.feedback_phase
        v_out = network.apply(model, x)
        phase = simulate(network, model, feedback, x, output_rate(network, v_out), d, generator,
                         accumulate_feedback=True)
        n = x.shape[0]
        updates = {
            key: phase.mean_feedback_corr[i] / (d.noise ** 2 * n) + s.feedback_decay * feedback[i]
            for i, key in enumerate(feedback_keys(network))
        }
    return updates, {"feedback_controller_u_norm": phase.u.norm() / n ** 0.5}


# why dfc refuses other models (Python's own modules reach `init`, named models the registry's check)
FULLY_CONNECTED_ONLY = ("Meulemans et al. 2021 define the controller and its feedback on fully connected "
                        "layers, and their code builds no convolutional one")


def _check_fully_connected(network) -> None:
    """One line naming why, for a network with any layer other than Linear (a model from Python)."""
    from torch import nn

    for i, block in enumerate(network.blocks):
        if not isinstance(getattr(block, "layer", None), nn.Linear):
            raise UserError(f"dfc supports MLPs only: {FULLY_CONNECTED_ONLY}; block {i} is a {type(getattr(block, 'layer', block)).__name__}")


def _build(s: Settings) -> Rule:
    s.check()

    def init(network, params, generator):
        _check_fully_connected(network)
        check_network(network, "dfc")
        model = params["model"]
        if s.feedback_init == "product":
            q = weight_product_feedback(network, model)
        else:  # Xavier-uniform-like, drawn from the run's generator
            q = []
            for i in range(network.num_blocks):
                rows = model[f"blocks.{i}.layer.weight"].shape[0]
                cols = model[f"blocks.{network.num_blocks - 1}.layer.weight"].shape[0]
                bound = (6.0 / (rows + cols)) ** 0.5
                ref = model[f"blocks.{i}.layer.weight"]
                q.append(((torch.rand(rows, cols, generator=generator) * 2 - 1) * bound).to(ref))
        q = {key: t.detach().clone() for key, t in zip(feedback_keys(network), q)}
        if s.feedback == "learned":
            return {**params, "feedback": q}, {}
        return params, {"feedback": q}

    def step(network, params, state, batch):
        model = params["model"]
        q_group = params["feedback"] if s.feedback == "learned" else state["feedback"]
        feedback = [q_group[k] for k in feedback_keys(network)]
        with torch.no_grad():
            v_out = network.apply(model, batch.x)
            target = output_target(network, v_out, batch.y, s.target_stepsize)
            ss = simulate(network, model, feedback, batch.x, target, s.forward,
                          accumulate_update=s.update == "trajectory", kind=s.difference)
            updates = {"model": forward_updates(network, model, ss, s)}
            loss = classification_loss(v_out, batch.y)
        controller, net = ss.controller_residual, ss.network_residual
        metrics = {
            "loss": loss,
            "controller_residual": controller,
            "network_residual": net,
            "steady_state_residual": torch.maximum(controller, net),
            "output_error_ratio": ss.e.norm() / ss.e0.norm().clamp_min(torch.finfo(ss.e.dtype).tiny),
        }
        if s.feedback == "learned":
            updates["feedback"], extra = feedback_updates(network, model, feedback, batch.x, s, batch.generator())
            metrics.update(extra)
        return updates, state, metrics

    return Rule(init=init, step=step, task="classify")


def dfc(
    steps: int = 40, dt: float = 0.1, tau_v: float = 0.1, tau_u: float = 1.0, k_p: float = 0.0,
    alpha: float = 0.01, target_stepsize: float = 0.1, feedback: str = "fixed",
    feedback_init: str = "product", difference: str = "voltage", update: str = "steady_state",
    feedback_steps: int = 40, feedback_dt: float = 0.05, feedback_noise: float = 0.1,
    feedback_alpha: float = 1.0, feedback_k_p: float = 0.0, feedback_tau_a: float = 0.2,
    feedback_decay: float = 1e-3,
) -> Rule:
    """Deep feedback control (Meulemans et al. 2021); see the module docstring."""
    return _build(Settings(
        target_stepsize,
        Dynamics(steps, dt, tau_v, tau_u, k_p, alpha),
        Dynamics(feedback_steps, feedback_dt, tau_v, tau_u, feedback_k_p, feedback_alpha, feedback_noise,
                 feedback_tau_a),
        feedback, feedback_init, feedback_decay, difference, update,
    ))


@hookimpl
def register_rules(register):
    options = {k: p.default for k, p in inspect.signature(dfc).parameters.items()}
    register(RuleSpec("dfc", dfc, "deep feedback control: a PI controller drives the network to its target "
                      "(Meulemans et al. 2021)", options=options, ranges=RANGES, models=("mlp",), models_note=FULLY_CONNECTED_ONLY,
                      model_defaults={"activation": "tanh"}))
