"""Backpropagation: the exact gradient of the classification loss, one `grad` over the forward.

Rumelhart, Hinton & Williams (1986). The reference every other rule is compared with.
"""

from __future__ import annotations

from fa_rules.core import Rule, RuleSpec, classification_loss, grad_and_value, hookimpl, no_state_init


def backprop() -> Rule:
    def step(network, params, state, batch):
        def loss_fn(model_params):
            return classification_loss(network.apply(model_params, batch.x), batch.y)

        grads, loss = grad_and_value(loss_fn)(params["model"])
        return {"model": grads}, state, {"loss": loss}

    return Rule(init=no_state_init, step=step, task="classify")


@hookimpl
def register_rules(register):
    register(RuleSpec("backprop", backprop, "exact gradient of the cross-entropy (the reference)"))
