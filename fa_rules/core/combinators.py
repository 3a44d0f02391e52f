"""Combinators that build rules from rules, so each rule module stays small.

- `partition(default, {block: rule})`: each block's model parameters are updated by the rule
  assigned to it (e.g. feedback alignment for the body, backprop for the last block).
- `weighted_sum([(w, rule), ...])`: updates and losses add with weights (e.g. a supervised loss
  plus the feature-alignment reversibility loss, Eq. 3-4 of the feature alignment paper).
- A sub-rule's declared weight decay (`Rule.weight_decay`) holds where its updates do: under
  `partition` on the model keys it owns and its own groups, under `weighted_sum` with its weight.
- `constrained(rule, clamp(...))`: parameter constraints the engine applies after each optimiser
  step (e.g. the weight clamp to +-sqrt(2), Eq. 9).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch

from fa_rules.core.network import Network
from fa_rules.core.rule import Batch, Constraint, Groups, Rule


def _init_all(rules: Sequence[Rule], network: Network, params: Groups, generator: torch.Generator):
    """Init the sub-rules in order; each sees the model params the previous ones returned (so a
    re-initialisation such as an orthogonal init is kept). Their own groups must not collide."""
    merged = dict(params)
    states = []
    owners: dict[str, int] = {}
    for i, rule in enumerate(rules):
        out, state = rule.init(network, {"model": merged["model"]}, generator)
        for group, tensors in out.items():
            if group == "model":
                merged["model"] = tensors
                continue
            if group in owners:
                raise ValueError(f"rules {owners[group]} and {i} both own parameter group '{group}'")
            owners[group] = i
            merged[group] = tensors
        states.append(state)
    return merged, {"states": states, "owners": owners}


def _sub_params(params: Groups, owners: dict[str, int], i: int) -> Groups:
    return {g: t for g, t in params.items() if g == "model" or owners.get(g) == i}


def _first(rules: Sequence[Rule], attr: str):
    return next((getattr(r, attr) for r in rules if getattr(r, attr) is not None), None)


def _sub_call(fn_name: str, rules: Sequence[Rule]):
    """Forward reconstruct/sample/evaluate to the first sub-rule that has one, with its own state."""
    for i, rule in enumerate(rules):
        fn = getattr(rule, fn_name)
        if fn is not None:

            def call(network, params, state, *args, _i=i, _fn=fn, **kwargs):
                sub = _sub_params(params, state["owners"], _i)
                return _fn(network, sub, state["states"][_i], *args, **kwargs)

            return call
    return None


def _combined(rules: Sequence[Rule], step, task: str, weight_decay=None) -> Rule:
    return Rule(
        init=lambda network, params, generator: _init_all(rules, network, params, generator),
        step=step,
        task=task,
        reconstruct=_sub_call("reconstruct", rules),
        sample=_sub_call("sample", rules),
        evaluate=_sub_call("evaluate", rules),
        constraints=tuple(c for r in rules for c in r.constraints),
        heads=_first(rules, "heads"),
        weight_decay=weight_decay if any(r.weight_decay is not None for r in rules) else None,
    )


def _declared(rule: Rule, network: Network, params: Groups) -> dict[str, dict[str, float]]:
    if rule.weight_decay is None:
        return {}
    return rule.weight_decay(network, params) or {}


def partition(default: Rule, blocks: dict[int | str, Rule]) -> Rule:
    """Model parameters of block `i` (negative indices count from the end; `"heads"` for the heads)
    are updated by `blocks[i]`, every other block by `default`. Rule-owned groups stay with their
    rule. The reported `loss` is the default rule's."""
    rules = [default, *blocks.values()]
    tasks = {r.task for r in rules}
    if len(tasks) != 1:
        raise ValueError(f"partitioned rules must share one task, got {sorted(tasks)}")

    def owner_of(network: Network, key: str) -> int:
        index = network.block_of(key)
        for j, sel in enumerate(blocks):
            if sel == "heads" and index is None:
                return j + 1
            if isinstance(sel, int) and index is not None and index == sel % network.num_blocks:
                return j + 1
        return 0

    def step(network: Network, params: Groups, state, batch: Batch):
        owners = state["owners"]
        results = [
            rule.step(network, _sub_params(params, owners, i), state["states"][i], batch)
            for i, rule in enumerate(rules)
        ]
        updates: Groups = {"model": {}}
        for key in params["model"]:
            updates["model"][key] = results[owner_of(network, key)][0]["model"][key]
        for group, i in owners.items():
            if group in results[i][0]:
                updates[group] = results[i][0][group]
        metrics = dict(results[0][2])
        for i, (_, _, m) in enumerate(results[1:], start=1):
            metrics.update({f"part{i}.{k}": v for k, v in m.items()})
        new_state = {"states": [r[1] for r in results], "owners": owners}
        return updates, new_state, metrics

    def weight_decay(network: Network, params: Groups):
        # a sub-rule's declared decay holds where its updates are used: the model keys it owns, its own groups
        out: dict[str, dict[str, float]] = {}
        for i, rule in enumerate(rules):
            for group, decays in _declared(rule, network, params).items():
                for key, value in decays.items():
                    if group != "model" or owner_of(network, key) == i:
                        out.setdefault(group, {})[key] = value
        return out

    return _combined(rules, step, default.task, weight_decay)


def weighted_sum(terms: Iterable[tuple[float, Rule]]) -> Rule:
    """Sum of rules' updates (and losses) with weights; the task is the first rule's."""
    terms = list(terms)
    weights = [float(w) for w, _ in terms]
    rules = [r for _, r in terms]

    def step(network: Network, params: Groups, state, batch: Batch):
        owners = state["owners"]
        updates: Groups = {}
        metrics = {}
        total_loss = 0.0
        new_states = []
        for i, (w, rule) in enumerate(zip(weights, rules)):
            upd, sub_state, m = rule.step(network, _sub_params(params, owners, i), state["states"][i], batch)
            new_states.append(sub_state)
            for group, tensors in upd.items():
                acc = updates.setdefault(group, {})
                for key, u in tensors.items():
                    acc[key] = acc[key] + w * u if key in acc else w * u
            metrics.update({f"term{i}.{k}": v for k, v in m.items()})
            if "loss" in m:
                total_loss = total_loss + w * m["loss"]
        metrics["loss"] = total_loss
        return updates, {"states": new_states, "owners": owners}, metrics

    def weight_decay(network: Network, params: Groups):
        # sum_i w_i (u_i + lambda_i p) = sum_i w_i u_i + (sum_i w_i lambda_i) p
        out: dict[str, dict[str, float]] = {}
        for w, rule in zip(weights, rules):
            for group, decays in _declared(rule, network, params).items():
                acc = out.setdefault(group, {})
                for key, value in decays.items():
                    acc[key] = acc.get(key, 0.0) + w * value
        return out

    return _combined(rules, step, rules[0].task, weight_decay)


def constrained(rule: Rule, *constraints: Constraint) -> Rule:
    """The same rule with parameter constraints applied after every optimiser step."""
    return dataclasses.replace(rule, constraints=rule.constraints + tuple(constraints))


def clamp(bound: float, groups: Sequence[str] = ("model",), include_bias: bool = False) -> Constraint:
    """Clamp parameters to [-bound, bound] (feature alignment paper, Eq. 9, with bound = sqrt(2))."""

    @torch.no_grad()
    def apply(params: Groups) -> None:
        for group in groups:
            for key, p in params.get(group, {}).items():
                if include_bias or not key.endswith("bias"):
                    p.clamp_(-bound, bound)  # in place: no second copy of every parameter

    apply.in_place = True
    return apply
