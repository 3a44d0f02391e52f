"""Every rule's step gives the same updates, state and loss on each of the engine's routes.

The engine evaluates a rule's derivatives the fastest way that gives the same numbers: plain
autograd, and for the feedback-alignment family closed-form loops or saved-tensor hooks. The route
it started from, `torch.func` throughout, stays reachable under `functional_transforms()` (it is
what `--compile` traces), and the memory probe runs plain autograd with every closed form and hook
off. Each registered rule, on each model the conformance suite uses, is stepped on all four routes
from the same parameters, state and batch; the results must agree to float32 rounding.
"""

import pytest
import torch

from fa_rules.core import autodiff
from fa_rules.core import feedback
from fa_rules.plugins.manager import get_registry
from fa_rules.testing import make_setup, models_to_check

CASES = [(name, model) for name, spec in sorted(get_registry().rules.items()) for model in models_to_check(spec)]


def _flat(tree, prefix=""):
    """`{path: tensor}` of every tensor in nested dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}/{k}"))
    return out


def _step(name, model):
    setup = make_setup(get_registry().rule(name), model=model)
    updates, state, metrics = setup.rule.step(setup.network, setup.params, setup.state, setup.batch)
    return _flat({"updates": updates, "state": state, "loss": torch.as_tensor(metrics["loss"])})


def _hooks_only(name, model, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(feedback, "closed_form_allowed", lambda: False)
        return _step(name, model)


def _torch_func(name, model, monkeypatch):
    with autodiff.functional_transforms():
        return _step(name, model)


def _probe(name, model, monkeypatch):
    with autodiff.SavedTensorsProbe():
        return _step(name, model)


@pytest.mark.parametrize("name,model", CASES)
def test_every_route_gives_the_default_steps_updates(name, model, monkeypatch):
    default = _step(name, model)
    assert any(path.startswith("/updates/") for path in default)
    for route in (_hooks_only, _torch_func, _probe):
        other = route(name, model, monkeypatch)
        assert other.keys() == default.keys(), route.__name__
        for path, value in default.items():
            torch.testing.assert_close(other[path], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{route.__name__} {path}: {m}")


def test_the_default_route_is_not_the_graph_route_for_the_family(monkeypatch):
    """The comparison above is not of a route with itself: on the zoo's MLP the default step of
    feedback alignment and DFA runs the closed-form loop, the others do not."""
    taken = []
    original = feedback._closed_form_block_forward
    monkeypatch.setattr(feedback, "_closed_form_block_forward", lambda *a: taken.append(1) or original(*a))
    for name in ("feedback_alignment", "direct_feedback_alignment"):
        taken.clear()
        _step(name, "mlp")
        assert taken, name
        for route in (_hooks_only, _torch_func, _probe):
            taken.clear()
            route(name, "mlp", monkeypatch)
            assert not taken, (name, route.__name__)
