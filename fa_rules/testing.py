"""Conformance checks every rule must pass, built-in or third-party.

Use from pytest:

    from fa_rules.testing import assert_conformant
    def test_my_rule():
        assert_conformant("my_rule")
        assert_conformant("my_rule", options={"variant": "b"})  # the rule made with these settings

Checks (each on a tiny real task: scikit-learn digits, upsampled for conv models), run on an MLP
(or the rule's first model) and, all but `learns`, also on the conv model `lenet` when the rule
supports it (100 training steps of a conv net cost a minute on a small CPU, and whether a loss falls
10% that fast on it measures tuning more than conformance):
  structure    updates mirror the parameters (groups, keys, shapes, dtypes, devices); a scalar `loss`
  finite       the first step's updates and loss hold no NaN or inf
  state_types  state holds only tensors and plain Python values (what checkpoints can load)
  determinism  the same seed gives identical initial state and identical updates
  no_mutation  `step` leaves params, state and batch untouched
  roundtrip    state survives torch.save / torch.load(weights_only=True): the next step is identical
  learns       the rule's training loss falls on the tiny task (by LEARNS_MIN_FALL over LEARNS_STEPS
               steps of Adam at LEARNS_LR; a failure says by how much it fell)

`assert_conformant` runs every check on every model, whatever each raises, and raises one
AssertionError listing each failure as `check [model]: reason`.
"""

from __future__ import annotations

import copy
import io
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fa_rules.core.autodiff import load_forward_ad
from fa_rules.core.network import Network
from fa_rules.core.rule import Batch, Groups, Rule, RuleSpec, state_problem
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import apply_updates, check_updates, declared_weight_decay, make_optimizers, nonfinite_update

CHECKS = ("structure", "finite", "state_types", "determinism", "no_mutation", "roundtrip", "learns")
CONV_MODEL = "lenet"


@dataclass
class Setup:
    spec: RuleSpec
    rule: Rule
    network: Network
    params: Groups
    state: object
    batch: Batch


def _tiny_data(shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target[:n], dtype=torch.int64)
    c, h, w = shape
    if (h, w) != (8, 8):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.expand(-1, c, -1, -1).contiguous(), y


def models_to_check(spec: RuleSpec) -> list[str]:
    """An MLP (or the rule's first model), and the conv model too where the rule supports it."""
    models = ["mlp" if spec.models is None or "mlp" in spec.models else spec.models[0]]
    if (spec.models is None or CONV_MODEL in spec.models) and CONV_MODEL not in models:
        models.append(CONV_MODEL)
    return models


def make_setup(spec: RuleSpec, seed: int = 0, n: int = 64, registry=None, rule_options: dict | None = None,
               model: str | None = None) -> Setup:
    """Build a rule, network (`model`, default the first of `models_to_check`), parameters, state
    and one batch, deterministically from `seed`."""
    from fa_rules.plugins.manager import get_registry

    registry = registry or get_registry()
    load_forward_ad()  # as the trainer does: torch's first forward-mode use warns, for no rule's fault
    rule = spec.make(**(rule_options or {}))
    model_name = model or models_to_check(spec)[0]
    model_spec = registry.model(model_name)
    shape = model_spec.example_shape
    x, y = _tiny_data(shape, n)
    out_shape = (10,) if rule.task == "classify" else (8,)
    heads = rule.heads(8, 10) if rule.heads else None
    options = {k: v for k, v in spec.model_defaults.items() if k in model_spec.options}
    if model_name == "mlp":
        options.update(depth=2, width=32)
    torch.manual_seed(seed)
    network = model_spec.make(shape, out_shape, heads, **options)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(seed + 1))
    return Setup(spec, rule, network, params, state, Batch(x, y, seed=1234 + seed))


def _step(s: Setup, state=None):
    return s.rule.step(s.network, s.params, s.state if state is None else state, s.batch)


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Identical, NaN equal to NaN (non-finite values are the `finite` check's to report)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.is_floating_point() or x.is_complex():
        return bool((x.eq(y) | (x.isnan() & y.isnan())).all())
    return torch.equal(x, y)


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(_equal(x, y) for x, y in zip(ta, tb))


def check_structure(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    s = make_setup(spec, model=model, rule_options=options)
    updates, _, metrics = _step(s)
    if not updates:
        raise AssertionError("step returned no updates")
    check_updates(spec.name, updates, s.params)
    if not isinstance(metrics, dict):
        raise AssertionError("metrics must be a dict")
    loss = metrics.get("loss")
    if not (isinstance(loss, (int, float)) or (isinstance(loss, torch.Tensor) and loss.numel() == 1)):
        raise AssertionError("metrics hold no scalar 'loss' (the contract requires one)")


def check_finite(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    s = make_setup(spec, model=model, rule_options=options)
    updates, _, metrics = _step(s)
    bad = nonfinite_update(updates)
    if bad is not None:
        raise AssertionError(f"update {bad[0]}/{bad[1]} holds NaN or inf")
    if "loss" in metrics and not torch.isfinite(torch.as_tensor(metrics["loss"], dtype=torch.float64)).all():
        raise AssertionError(f"loss is {float(metrics['loss'])}")


def check_state_types(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    s = make_setup(spec, model=model, rule_options=options)
    for when, state in (("after init", s.state), ("after a step", _step(s)[1])):
        problem = state_problem(state)
        if problem:
            raise AssertionError(f"{when}, {problem}; state may hold only tensors and plain Python values")


def check_determinism(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    a, b = (make_setup(spec, model=model, rule_options=options) for _ in range(2))
    if not _same(a.params, b.params) or not _same(a.state, b.state):
        raise AssertionError("the same seed gave different initial parameters or state")
    ua, sa, _ = _step(a)
    ub, sb, _ = _step(b)
    if not _same(ua, ub) or not _same(sa, sb):
        raise AssertionError("the same seed gave different updates or state")


def check_no_mutation(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    s = make_setup(spec, model=model, rule_options=options)
    before = copy.deepcopy((s.params, s.state, s.batch.x, s.batch.y))
    _step(s)
    if not _same(before, (s.params, s.state, s.batch.x, s.batch.y)):
        raise AssertionError("step mutated its inputs (params, state or batch)")


def check_roundtrip(spec: RuleSpec, model: str | None = None, options: dict | None = None) -> None:
    s = make_setup(spec, model=model, rule_options=options)
    _, state, _ = _step(s)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # as checkpoints are loaded
    if not _same(state, loaded):
        raise AssertionError("state changed in a torch.save / torch.load round trip")
    if not _same(_step(s, state)[0], _step(s, loaded)[0]):
        raise AssertionError("a step from the reloaded state differs from a step from the original")


LEARNS_STEPS, LEARNS_LR, LEARNS_MIN_FALL = 100, 3e-3, 0.10


def check_learns(spec: RuleSpec, model: str | None = None, options: dict | None = None, steps: int = LEARNS_STEPS,
                 lr: float = LEARNS_LR, min_fall: float = LEARNS_MIN_FALL) -> None:
    """The mean loss of the last 5 of `steps` steps (Adam at `lr`) is at least `min_fall` below that
    of the first 5."""
    s = make_setup(spec, n=128, model=model, rule_options=options)
    config = TrainConfig(lr=lr)
    optimizers = make_optimizers(config, s.params)
    decay = declared_weight_decay(spec.name, s.rule, s.network, s.params)
    losses = []
    state = s.state
    for i in range(steps):
        batch = Batch(s.batch.x, s.batch.y, seed=i)
        updates, state, metrics = s.rule.step(s.network, s.params, state, batch)
        apply_updates(s.rule, s.params, updates, optimizers, decay)
        losses.append(float(metrics["loss"]))
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    if not last < (1 - min_fall) * first:
        fell = (first - last) / abs(first) if first else 0.0
        change = (f"loss fell {fell:.1%}" if fell > 0 else f"loss rose {-fell:.1%}" if fell < 0 else
                  "loss did not change" if first == last else "loss did not fall")  # (a NaN or inf)
        raise AssertionError(f"{change} (mean of the first 5 steps {first:.4f}, of the last 5 {last:.4f}); "
                             f"the check requires a fall of {min_fall:.0%} over {steps} steps at lr {lr:g}")


_CHECK_FUNCTIONS: dict[str, Callable[..., None]] = {
    "structure": check_structure,
    "finite": check_finite,
    "state_types": check_state_types,
    "determinism": check_determinism,
    "no_mutation": check_no_mutation,
    "roundtrip": check_roundtrip,
    "learns": check_learns,
}


def _failures(spec: RuleSpec, check: str, options: dict | None = None) -> list[str]:
    """`check [model]: reason` for each model the check fails on; any exception is a failure."""
    failures = []
    models = models_to_check(spec)
    for model in models[:1] if check == "learns" else models:
        try:
            _CHECK_FUNCTIONS[check](spec, model, options)
        except Exception as e:  # a ValueError or KeyError from the rule is its failure, not a crash
            reason = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            failures.append(f"{check} [{model}]: {reason}")
    return failures


def _spec(rule: str | RuleSpec) -> RuleSpec:
    from fa_rules.plugins.manager import get_registry

    return rule if isinstance(rule, RuleSpec) else get_registry().rule(rule)


def run_check(rule: str | RuleSpec, check: str, options: dict | None = None) -> None:
    """Run one named check on every model it applies to, the rule made with `options` (its settings,
    as `--opt` gives them); raises AssertionError with the reasons."""
    failures = _failures(_spec(rule), check, options)
    if failures:
        raise AssertionError("; ".join(failures))


def assert_conformant(rule: str | RuleSpec, options: dict | None = None) -> None:
    """Run every check on every model, the rule made with `options` (its settings, e.g.
    `{"feedback": "fixed"}`), whatever each raises; one AssertionError lists each failure."""
    spec = _spec(rule)
    failures = [failure for check in CHECKS for failure in _failures(spec, check, options)]
    if failures:
        with_options = f" with options {options}" if options else ""
        raise AssertionError(f"rule '{spec.name}'{with_options} is not conformant: " + "; ".join(failures))
