"""An example third-party rule: `readout_only` trains the last block and leaves the rest at its
random initialisation (a random-features baseline; the floor any credit-assignment rule for the
hidden layers should beat). It shows the per-block API: one forward for the hidden activations,
then `grad` of the loss with respect to the last block's parameters alone.
"""

import torch

from fa_rules.core import Rule, RuleSpec, classification_loss, grad_and_value, hookimpl, no_state_init


def readout_only(detach_features: bool = True) -> Rule:
    def step(network, params, state, batch):
        model = params["model"]
        last = network.num_blocks - 1
        hidden, _ = network.activations(model, batch.x)
        features = hidden[last - 1] if last > 0 else batch.x
        if detach_features:
            features = features.detach()
        keys = network.block_keys[last]

        def loss_fn(block_params):
            return classification_loss(network.block_apply(last, block_params, features), batch.y)

        grads, loss = grad_and_value(loss_fn)({k: model[k] for k in keys})
        updates = {k: grads[k] if k in grads else torch.zeros_like(v) for k, v in model.items()}
        return {"model": updates}, state, {"loss": loss}

    return Rule(init=no_state_init, step=step, task="classify")


@hookimpl
def register_rules(register):
    register(RuleSpec("readout_only", readout_only, "train the last block only (random-features floor)",
                      options={"detach_features": True}))
