import math

import torch

from fa_rules.core import clamp, constrained, partition, weighted_sum
from fa_rules import models as zoo
from fa_rules.core.rule import Batch, Rule, no_state_init
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.rules.backprop import backprop


def constant_rule(value: float, loss: float = 1.0) -> Rule:
    def step(network, params, state, batch):
        return {"model": {k: torch.full_like(v, value) for k, v in params["model"].items()}}, state, {"loss": loss}

    return Rule(init=no_state_init, step=step)


def _setup():
    net = zoo.mlp((1, 8, 8), (10,), depth=2, width=8)
    return net, {"model": net.init_params()}, Batch(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))


def test_partition_takes_each_block_from_its_rule():
    net, params, batch = _setup()
    rule = partition(constant_rule(1.0), {-1: constant_rule(2.0), 0: backprop()})
    params, state = rule.init(net, params, torch.Generator())
    updates, _, _ = rule.step(net, params, state, batch)
    bp, _, _ = backprop().step(net, params, {}, batch)
    for key, u in updates["model"].items():
        block = net.block_of(key)
        if block == 0:
            assert torch.allclose(u, bp["model"][key])
        else:
            assert torch.all(u == (2.0 if block == 2 else 1.0)), key


def test_weighted_sum_adds_updates_and_losses():
    net, params, batch = _setup()
    # values chosen so that weighted and unweighted sums differ: updates 0.5*2 + 3*1 = 4 (not 3),
    # losses 0.5*4 + 3*2 = 8 (not 6); the terms' own losses are kept unweighted
    rule = weighted_sum([(0.5, constant_rule(2.0, loss=4.0)), (3.0, constant_rule(1.0, loss=2.0))])
    params, state = rule.init(net, params, torch.Generator())
    updates, _, metrics = rule.step(net, params, state, batch)
    assert all(torch.all(u == 4.0) for u in updates["model"].values())
    assert metrics["loss"] == 8.0
    assert metrics["term0.loss"] == 4.0 and metrics["term1.loss"] == 2.0


def test_clamp_constraint_is_applied_after_the_optimiser_step():
    net, params, batch = _setup()
    bound = math.sqrt(2)
    rule = constrained(constant_rule(-1.0), clamp(bound))
    params, state = rule.init(net, params, torch.Generator())
    optimizers = make_optimizers(TrainConfig(optimizer="sgd", lr=10.0, momentum=0.0), params)
    updates, _, _ = rule.step(net, params, state, batch)
    apply_updates(rule, params, updates, optimizers)
    for key, p in params["model"].items():
        if key.endswith("weight"):
            assert p.max() <= bound + 1e-7 and p.max() >= bound - 1e-6
        else:  # biases are not clamped by default
            assert p.min() > 9.0


def test_combinators_keep_a_sub_rules_reinitialisation_of_the_model():
    def zero_init(network, params, generator):
        return {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}, {}

    reinit = Rule(init=zero_init, step=constant_rule(1.0).step)
    net, params, _ = _setup()
    for combined in (weighted_sum([(1.0, reinit), (1.0, backprop())]), partition(backprop(), {0: reinit})):
        out, _ = combined.init(net, params, torch.Generator())
        assert all(torch.all(v == 0) for v in out["model"].values())


def test_in_place_clamp_gives_the_values_of_the_pure_clamp_it_replaced():
    """The clamp is applied with clamp_ on the parameters themselves (no copy back); the values
    are the ones the former pure map (clamp, then copy_) gave, bit for bit."""

    def pure_clamp(params):  # the former implementation
        return {"model": {k: v.clamp(-0.5, 0.5) if not k.endswith("bias") else v for k, v in params["model"].items()}}

    net, params, batch = _setup()
    in_place_rule = constrained(constant_rule(-1.0), clamp(0.5))
    pure_rule = constrained(constant_rule(-1.0), pure_clamp)
    results = []
    for rule in (in_place_rule, pure_rule):
        torch.manual_seed(0)
        p = {"model": {k: torch.randn_like(v) for k, v in params["model"].items()}}
        storage = {k: v.data_ptr() for k, v in p["model"].items()}
        optimizers = make_optimizers(TrainConfig(optimizer="sgd", lr=0.3, momentum=0.0), p)
        for _ in range(3):
            updates, _, _ = rule.step(net, p, {}, batch)
            apply_updates(rule, p, updates, optimizers)
        assert {k: v.data_ptr() for k, v in p["model"].items()} == storage  # the same tensors
        results.append(p["model"])
    assert clamp(0.5).in_place
    weights = [k for k in results[0] if k.endswith("weight")]
    assert weights and all(results[0][k].abs().max() == 0.5 for k in weights)  # the clamp did act
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def decaying_rule(value: float, decay: dict) -> Rule:
    """constant_rule that declares an L2 term `decay` (group -> key -> lambda)."""
    return Rule(init=no_state_init, step=constant_rule(value).step, weight_decay=lambda network, params: decay)


def test_declared_weight_decay_follows_the_combinators():
    from fa_rules.core.trainer import declared_weight_decay

    net, params, _ = _setup()
    w0, w2 = "blocks.0.layer.weight", "blocks.2.layer.weight"
    first, last = decaying_rule(1.0, {"model": {w0: 0.5, w2: 0.5}}), decaying_rule(1.0, {"model": {w2: 3.0}})
    # partition: each rule's decay only on the model keys it updates (block 2 belongs to `last`)
    split = partition(first, {-1: last})
    assert declared_weight_decay("split", split, net, params) == {"model": {w0: 0.5, w2: 3.0}}
    assert declared_weight_decay("bare", partition(constant_rule(1.0), {-1: backprop()}), net, params) == {}
    # weighted sum: sum_i w_i (u_i + lambda_i p), so the decays add with the weights
    summed = weighted_sum([(2.0, first), (0.5, last)])
    assert declared_weight_decay("sum", summed, net, params) == {"model": {w0: 1.0, w2: 1.0 + 1.5}}
    assert constrained(first, clamp(1.0)).weight_decay is first.weight_decay


def test_a_bad_weight_decay_declaration_is_a_one_line_rule_error():
    import pytest

    from fa_rules.core.errors import RuleError
    from fa_rules.core.trainer import declared_weight_decay

    net, params, _ = _setup()
    with pytest.raises(RuleError, match=r"rule 'r' declares weight decay for model/nope, which is not a parameter"):
        declared_weight_decay("r", decaying_rule(1.0, {"model": {"nope": 0.1}}), net, params)
    with pytest.raises(RuleError, match=r"weight decay of model/blocks.0.layer.bias must be a finite number, got nan"):
        declared_weight_decay("r", decaying_rule(1.0, {"model": {"blocks.0.layer.bias": float("nan")}}), net, params)
    # zero entries are dropped: nothing to add
    assert declared_weight_decay("r", decaying_rule(1.0, {"model": {"blocks.0.layer.bias": 0.0}}), net, params) == {}


def test_an_update_laid_out_unlike_its_parameter_moves_each_weight_as_a_contiguous_one_would():
    """A second-order pass can hand back a conv weight's update transposed in memory; the optimisers
    (Adam's direct call, fused SGD) must still read entry (i, j, ...) as that weight's update."""
    net = zoo.lenet((1, 8, 8), (10,))
    for optimizer in ("adam", "sgd"):
        results = []
        for transposed in (False, True):
            params = {"model": {k: v.clone() for k, v in net.init_params().items()}}
            torch.manual_seed(0)
            values = {k: torch.randn(v.shape) for k, v in params["model"].items()}

            def step(network, p, state, batch, _values=values, _transposed=transposed):
                if not _transposed:
                    return {"model": {k: v.clone() for k, v in _values.items()}}, state, {"loss": 1.0}
                # the same numbers, stored with the dimensions reversed (non-contiguous views)
                flipped = {k: v.permute(*reversed(range(v.dim()))).contiguous().permute(*reversed(range(v.dim())))
                           for k, v in _values.items()}
                assert any(not u.is_contiguous() for u in flipped.values())
                return {"model": flipped}, state, {"loss": 1.0}

            rule = Rule(init=no_state_init, step=step)
            optimizers = make_optimizers(TrainConfig(optimizer=optimizer, lr=0.1), params)
            for _ in range(2):
                updates, _, _ = rule.step(net, params, {}, None)
                apply_updates(rule, params, updates, optimizers)
            results.append(params["model"])
        for key in results[0]:
            assert torch.equal(results[0][key], results[1][key]), (optimizer, key)
