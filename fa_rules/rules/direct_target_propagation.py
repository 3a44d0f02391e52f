"""Direct difference target propagation: `ddtp` (DDTP-linear with the difference reconstruction loss).

Meulemans, Carzaniga, Suykens, Sacramento & Grewe (2020), "A theoretical framework for target
propagation", NeurIPS (arXiv 2006.14331), sec. 4-5. Every hidden value `h_i` (block outputs, the
"post" space of `fa_rules.rules.target_propagation`) gets its target straight from the output
through a linear feedback map `g_i(h_L) = Q_i h_L` (DDTP-linear), in the difference form of DTP:

    tau_L = h_L - beta dl/dh_L                                  (output target, per-example loss)
    tau_i = h_i + g_i(tau_L) - g_i(h_L) = h_i + Q_i (tau_L - h_L)

Each block then descends its local loss `||f_i(h_{i-1}) - tau_i||^2 / (2 beta)` (the same forward
update as `dtp`: `target_propagation.forward_updates`), so the output block gets exactly its true
gradient. The feedback maps are trained inside each step, before the targets are computed, by
`feedback_iters` SGD steps of size `feedback_lr` on the difference reconstruction loss (DRL) of the
direct form (the paper's eq. for L^rec with direct feedback connections):

    L_i = ||g_i(f_{L,i}(h_i + eps_1)) - g_i(h_L) - eps_1||^2 + drl_reg ||g_i(h_L + eps_2) - g_i(h_L)||^2

with `f_{L,i}` the network from `h_i` to the output, `eps_1`, `eps_2 ~ N(0, feedback_noise^2)`.
For small noise the first term asks `Q_i J_i = I` on the noise directions (`J_i = d h_L / d h_i`),
the second damps it: the minimiser is `Q_i = J_i^T (J_i J_i^T + drl_reg I)^{-1}`, with which the
targets are Gauss-Newton targets (the paper's theorem on DTP and Gauss-Newton optimisation). With
`feedback_normalise` each map's loss is divided by `E ||f_{L,i}(h_i + eps_1) - h_L||^2 + drl_reg
E ||eps_2||^2`, its input's energy: a normalised LMS step whose size does not depend on the scale.
`Q_i` lives in the rule's state (`feedback`), like the decoders of `dtp`.

Cost per step against a backprop step: one forward pass, `feedback_iters` noisy forwards from every
hidden block to the output (L - 1 partial forwards) and the local losses' weight gradients. The
forward pass runs each block on its input cut from the graph (`local_forward`), so its graph holds
exactly the local losses' dependence on each block's own weights: one backward through it gives
every block its update without recomputing its forward. The DRL's gradient with respect to `Q_i`
is taken in closed form, `(recon^T (f_{L,i}(h_i + eps_1) - h_L) + drl_reg damp^T eps_2) / (N scale)`
with `recon` and `damp` the two residuals (by `grad` under the memory probe, which measures what
autograd saves).

Convolutional networks (`lenet`, `vgg`, `simple_vgg`) as the paper's code trains them (its
`DDTPConvLayer`: a conv, the activation and a max pool, whose feedback is one dense matrix from the
output to the flattened pooled feature map, DDTP-linear with a linear feedback activation): the
hidden value `h_i` is block i's whole output (after its pool) flattened, `Q_i` maps the output to
it and the target is reshaped back to the feature map. Nothing is unpooled or transposed: the
feedback is direct, and `f_{L,i}` is the network's own forward from block i (pools included).
Needs a plain chain of blocks (no heads).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fa_rules.core import Rule, RuleSpec, classification_loss, grad, hookimpl, vjp
from fa_rules.core.autodiff import closed_form_allowed
from fa_rules.core.rule import ITERATIONS, NON_NEGATIVE, POSITIVE
from fa_rules.core.inverse import forward_values
from fa_rules.rules import target_propagation as tp


@dataclass(frozen=True)
class Settings:
    beta: float
    feedback_lr: float
    feedback_iters: int
    feedback_noise: float
    drl_reg: float
    feedback_normalise: bool

    def local(self) -> tp.Settings:
        """The settings `target_propagation.forward_updates` reads (plain local losses, post space)."""
        return tp.Settings(self.beta, "post", self.feedback_lr, self.feedback_iters, self.feedback_noise,
                           "autoencoder", self.feedback_normalise)


def hidden_blocks(network) -> list[int]:
    """Blocks whose output is a hidden value with a direct feedback map (all but the output block)."""
    return list(range(network.num_blocks - 1))


def forward_from(network, model, i: int, h: torch.Tensor) -> torch.Tensor:
    """`f_{L,i}`: the network from block i's output to the network output."""
    for j in range(i + 1, network.num_blocks):
        h = network.block_apply(j, model, h)
    return h


def drl_residuals(q, h_moved_out, h_out, eps_1, eps_2):
    """`(change, recon, damp)`: the output's change `f_{L,i}(h_i + eps_1) - h_L` and the DRL's two
    residuals, `Q change - eps_1` and `Q eps_2` (one row per example)."""
    change = h_moved_out - h_out
    return change, change @ q.T - eps_1.flatten(1), eps_2 @ q.T


def drl_loss(q, h_moved_out, h_out, eps_1, eps_2, reg, scale):
    """The direct DRL of one linear map `Q` (mean over the batch, halved, divided by `scale`)."""
    _, recon, damp = drl_residuals(q, h_moved_out, h_out, eps_1, eps_2)
    per_example = recon.pow(2).sum(1) + reg * damp.pow(2).sum(1)
    return 0.5 * per_example.mean() / scale


def drl_grads(qs: dict, inputs: dict, h_out, reg: float) -> dict:
    """The gradient of `drl_loss` with respect to each `Q` in closed form (two products each)."""
    grads = {}
    for k, (moved, eps_1, eps_2, scale) in inputs.items():
        change, recon, damp = drl_residuals(qs[k], moved, h_out, eps_1, eps_2)
        grads[k] = (recon.T @ change + reg * (damp.T @ eps_2)) / (change.shape[0] * scale)
    return grads


def local_forward(network, model, x):
    """`([h_0 = x, h_1, ..., h_L], local_grads)`: one forward pass in which every block sees its
    input cut from the graph, and `local_grads(cotangents)`, the gradient of `sum_i <h_i,
    cotangent_i>` with respect to `model`, which reaches each block's parameters from its own
    output only (the local losses' gradients, from the forward pass's own graph)."""
    def blocks(params):
        h, outputs = x, []
        for i in range(network.num_blocks):
            h = network.block_apply(i, params, h.detach())
            outputs.append(h)
        return outputs

    outputs, local_grads = vjp(blocks, model)
    return [x, *outputs], lambda cotangents: local_grads(cotangents)[0]


def train_feedback(network, model, feedback, values, s: Settings, generator) -> dict:
    """`feedback_iters` SGD steps on every map's DRL; one `grad` over their sum (each loss involves
    only its own map)."""
    params = dict(feedback)
    h_out = values[-1]
    for _ in range(s.feedback_iters):
        inputs = {}
        for i in hidden_blocks(network):
            h = values[i + 1]
            eps_1 = s.feedback_noise * torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
            eps_2 = s.feedback_noise * torch.randn(h_out.shape, generator=generator, device=h.device, dtype=h.dtype)
            moved = forward_from(network, model, i, h + eps_1)
            scale = 1.0
            if s.feedback_normalise:
                scale = tp.average_across_processes(
                    (moved - h_out).pow(2).sum(1).mean() + s.drl_reg * eps_2.pow(2).sum(1).mean())
            inputs[f"blocks.{i}"] = (moved, eps_1, eps_2, scale)

        def loss_fn(qs, _inputs=inputs):
            return sum(drl_loss(qs[k], moved, h_out, e1, e2, s.drl_reg, scale)
                       for k, (moved, e1, e2, scale) in _inputs.items())

        g = drl_grads(params, inputs, h_out, s.drl_reg) if closed_form_allowed() else grad(loss_fn)(params)
        g = tp.average_across_processes(g)
        params = {k: q - s.feedback_lr * g[k] for k, q in params.items()}
    return params


def compute_targets(network, model, feedback, values, y, s: Settings) -> list[torch.Tensor | None]:
    """`[None, tau_1, ..., tau_L]` aligned with `values`: the output target, and for every hidden
    value `h_i + Q_i (tau_L - h_L)`."""
    top = values[-1] - s.beta * tp.output_delta(network, values, y, "post")
    targets = [None] * len(values)
    targets[-1] = top.detach()
    change = targets[-1] - values[-1]
    for i in hidden_blocks(network):
        h = values[i + 1]
        targets[i + 1] = (h + (change @ feedback[f"blocks.{i}"].T).reshape(h.shape)).detach()
    return targets


def _build(s: Settings) -> Rule:
    def init(network, params, generator):
        tp._check_network(network)
        model = params["model"]
        reference = next(iter(model.values()))
        out_size = values_numel(network)[-1]
        feedback = {}
        for i, numel in zip(hidden_blocks(network), values_numel(network)[1:-1]):
            bound = 1.0 / out_size ** 0.5  # PyTorch's default Linear scale for a map from the output
            q = (torch.rand(numel, out_size, generator=generator, dtype=reference.dtype) * 2 - 1) * bound
            feedback[f"blocks.{i}"] = q.to(reference.device)
        return params, {"feedback": feedback}

    def step(network, params, state, batch):
        model = params["model"]
        values, local_grads = local_forward(network, model, batch.x)
        with torch.no_grad():
            feedback = train_feedback(network, model, state["feedback"], values, s, batch.generator())
            targets = compute_targets(network, model, feedback, values, batch.y, s)
            # d/dh_i of the local loss ||h_i - tau_i||^2 / (2 beta N) (the output's: its true gradient)
            n = batch.x.shape[0]
            cotangents = [(h - t) / (s.beta * n) for h, t in zip(values[1:], targets[1:])]
        updates = local_grads(cotangents)
        with torch.no_grad():
            loss = classification_loss(values[-1], batch.y)
        return {"model": updates}, {**state, "feedback": feedback}, {"loss": loss}

    @torch.no_grad()
    def evaluate(network, params, state, batch):
        """`feedback_inversion_error` per hidden block: `||Q_i J_i - I||`-like, measured as
        `||Q_i (f_{L,i}(h_i + eps) - h_L) - eps|| / ||eps||` with small noise (0: a left inverse on
        the noise directions reachable through the output; 1: no better than Q = 0)."""
        model, feedback = params["model"], state["feedback"]
        values = forward_values(network, model, batch.x, "post")
        generator = torch.Generator(device=batch.x.device).manual_seed(0)
        errors = []
        for i in hidden_blocks(network):
            h = values[i + 1]
            eps = 1e-3 * torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
            moved = forward_from(network, model, i, h + eps)
            rebuilt = (moved - values[-1]) @ feedback[f"blocks.{i}"].T
            errors.append(float((rebuilt - eps.flatten(1)).norm() / eps.norm()))
        return {"feedback_inversion_error": errors}

    return Rule(init=init, step=step, task="classify", evaluate=evaluate)


def values_numel(network) -> list[int]:
    from fa_rules.core.inverse import value_shapes

    return [int(torch.tensor(shape).prod()) if shape else 1 for shape in value_shapes(network)]


def ddtp(
    beta: float = 0.5, feedback_lr: float = 1.0, feedback_iters: int = 1, feedback_noise: float = 0.1,
    drl_reg: float = 0.1, feedback_normalise: bool = True,
) -> Rule:
    """Direct difference target propagation, DDTP-linear with the DRL (Meulemans et al. 2020)."""
    return _build(Settings(beta, feedback_lr, feedback_iters, feedback_noise, drl_reg, feedback_normalise))


@hookimpl
def register_rules(register):
    options = {k: p.default for k, p in inspect.signature(ddtp).parameters.items()}
    ranges = {"beta": POSITIVE, "feedback_lr": NON_NEGATIVE, "feedback_iters": ITERATIONS,
              "feedback_noise": POSITIVE,  # the difference reconstruction loss learns from the noise
              "drl_reg": NON_NEGATIVE}
    register(RuleSpec("ddtp", ddtp, "direct difference target propagation, linear direct feedback trained by "
                      "the difference reconstruction loss (Meulemans et al. 2020)", options=options, ranges=ranges,
                      models=tp.MODELS, model_defaults=tp.MODEL_DEFAULTS))
