"""One step on torchvision's resnet18 equals BioTorch 0.0.16's converted model.

BioTorch converts a module by swapping every Conv2d and Linear for a layer of its own; ours wraps
the same module (`as_network`, blocks cut by torch.fx) and routes its feedback
(`fa_rules.core.feedback`). Both copies start from identical float64 weights, ours is given
BioTorch's feedback tensors (`weight_backward`), and each parameter's update must equal BioTorch's
`.grad` after `loss.backward()` to 1e-10, relative to the largest entry of that tensor:

- `fa` is our `feedback_alignment`;
- `usf` is our `sign_symmetry` with `magnitude=xavier` (`sqrt(2 / (fan_in + fan_out)) sign(W)`);
- `dfa` is our `direct_feedback_alignment` with `targets=layers`: every conv and linear layer's
  input receives the output error through its own projection in place of `W^T g`.

Batch norm's running statistics after our step (recorded during it, applied after it) must equal
those of a plain `model.train(); model(x)` on a third copy.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from fa_rules.core import autodiff
from fa_rules.core.errors import UserError
from fa_rules.core.network import as_network, recording_statistics, update_running_statistics
from fa_rules.core.rule import Batch
from fa_rules.plugins.manager import get_registry
from fa_rules.testing import make_setup

torchvision = pytest.importorskip("torchvision")
needs_biotorch = pytest.mark.needs_package("biotorch", "pip install biotorch==0.0.16", module="biotorch")
TOLERANCE = 1e-10
SHAPE = (3, 32, 32)


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, *SHAPE, generator=generator, dtype=torch.float64), torch.tensor([0, 3, 7, 9])


def _module_path(key: str) -> str:
    """`blocks.2.layer1.0.conv1.weight` -> `layer1.0.conv1.weight`: the user's own name."""
    return key.split(".", 2)[2]


def _biotorch_grads(model, mode, x, y) -> tuple[dict, dict]:
    """(`{module path: .grad}`, `{layer path: converted layer}`) of one backward of BioTorch's
    conversion of a copy of `model`."""
    from biotorch.module.biomodule import BioModule

    bio = BioModule(copy.deepcopy(model), mode=mode, output_dim=10 if mode == "dfa" else None)
    bio.double()  # its feedback tensors are made in the default dtype
    bio.train()
    out = bio(x, targets=y, loss_function=F.cross_entropy) if mode == "dfa" else bio(x)
    F.cross_entropy(out, y).backward()
    grads = {k.removeprefix("module."): p.grad for k, p in bio.named_parameters() if p.requires_grad}
    return grads, dict(bio.module.named_modules())


def _our_step(model, rule_name, options, x, y, feedback_from=None):
    """`(updates, network)`: one step of our rule on a copy of `model`, its feedback tensors replaced
    by `feedback_from(key)` for every key of the rule's feedback state, running statistics updated."""
    network = as_network(copy.deepcopy(model), SHAPE, (10,), "resnet18")
    rule = get_registry().rule(rule_name).make(**options)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    for group in ("feedback", "projections"):
        for key in state.get(group, {}):
            replacement = feedback_from(key)
            assert replacement.shape == state[group][key].shape, key
            state[group][key] = replacement
    with recording_statistics(network) as stats:
        updates, _, _ = rule.step(network, params, state, Batch(x, y, 0))
    update_running_statistics(network, stats)
    return updates["model"], network


def _weight_backward(bio_layers):
    return lambda key: bio_layers[_module_path(key).removesuffix(".weight")].weight_backward.detach().clone()


def _assert_equal_updates(ours: dict, theirs: dict):
    assert {_module_path(k) for k in ours} == set(theirs)
    for key, update in ours.items():
        reference = theirs[_module_path(key)]
        error = (update - reference).abs().max() / reference.abs().max()
        assert error <= TOLERANCE, f"{key}: relative error {error:.3g}"


def _assert_moves_away_from_backprop(ours: dict, model, x, y):
    """At least one weight's update is far from backprop's gradient (so the parity is not vacuous)."""
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    true = {k: p.grad for k, p in reference.named_parameters()}
    worst = max(((ours[k] - true[_module_path(k)]).norm() / true[_module_path(k)].norm()).item() for k in ours)
    assert worst > 0.1


def _assert_torch_running_statistics(network, model, x):
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x)
    theirs = dict(reference.named_buffers())
    ours = {_module_path(k): v for k, v in network.named_buffers()}
    assert ours.keys() == theirs.keys() and len(ours) == 3 * 20  # resnet18's 20 batch norms
    for name, buffer in theirs.items():
        torch.testing.assert_close(ours[name], buffer, rtol=0, atol=1e-12, msg=name)
    assert not torch.equal(theirs["bn1.running_var"], dict(model.named_buffers())["bn1.running_var"])


@needs_biotorch
def test_feedback_alignment_step_equals_biotorch_fa_on_resnet18():
    model, (x, y) = _resnet18(), _batch()
    theirs, bio_layers = _biotorch_grads(model, "fa", x, y)
    ours, network = _our_step(model, "feedback_alignment", {}, x, y, _weight_backward(bio_layers))
    _assert_equal_updates(ours, theirs)
    _assert_moves_away_from_backprop(ours, model, x, y)
    _assert_torch_running_statistics(network, model, x)


@needs_biotorch
def test_sign_symmetry_with_xavier_magnitude_equals_biotorch_usf_on_resnet18():
    model, (x, y) = _resnet18(), _batch()
    theirs, _ = _biotorch_grads(model, "usf", x, y)
    ours, network = _our_step(model, "sign_symmetry", {"magnitude": "xavier"}, x, y)  # no state: from W
    _assert_equal_updates(ours, theirs)
    _assert_moves_away_from_backprop(ours, model, x, y)
    _assert_torch_running_statistics(network, model, x)


@needs_biotorch
def test_layer_dfa_step_equals_biotorch_dfa_on_resnet18():
    model, (x, y) = _resnet18(), _batch()
    theirs, bio_layers = _biotorch_grads(model, "dfa", x, y)
    ours, network = _our_step(model, "direct_feedback_alignment", {"targets": "layers"}, x, y,
                              _weight_backward(bio_layers))
    _assert_equal_updates(ours, theirs)
    _assert_moves_away_from_backprop(ours, model, x, y)
    _assert_torch_running_statistics(network, model, x)


def test_layer_dfa_takes_the_same_step_under_torch_func():
    """The surrogate's gradient, by plain autograd and inside `torch.func.grad_and_value`."""
    model, (x, y) = _resnet18(), _batch()
    network = as_network(model, SHAPE, (10,), "resnet18")
    rule = get_registry().rule("dfa").make(targets="layers")
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    assert len(state["projections"]) == 21  # every conv and the fc
    assert state["projections"]["blocks.2.layer1.0.conv1.weight"].shape == (10, 64, 3, 3)
    assert state["projections"]["blocks.6.fc.weight"].shape == (10, 512)
    plain, _, metrics = rule.step(network, params, state, Batch(x, y, 0))
    with autodiff.functional_transforms():
        functional, _, functional_metrics = rule.step(network, params, state, Batch(x, y, 0))
    for key, update in plain["model"].items():
        torch.testing.assert_close(functional["model"][key], update, rtol=1e-12, atol=1e-14, msg=key)
    assert not metrics["loss"].requires_grad
    torch.testing.assert_close(functional_metrics["loss"], metrics["loss"])


def test_layer_dfa_on_an_mlp_is_block_dfa_with_each_next_layers_projection():
    """On Linear -> activation blocks a block's output is the next layer's input, so layer-level DFA
    with projections `D` is block-level DFA with projections `D^T` of the next layer."""
    spec = get_registry().rule("direct_feedback_alignment")
    layers = make_setup(spec, rule_options={"targets": "layers"}, model="mlp")
    blocks = make_setup(spec, model="mlp")
    projections = layers.state["projections"]
    assert list(projections) == ["blocks.1.layer.weight", "blocks.2.layer.weight"]
    blocks.state["projections"] = {f"blocks.{i}": projections[f"blocks.{i + 1}.layer.weight"].T for i in range(2)}
    by_layers, _, _ = layers.rule.step(layers.network, layers.params, layers.state, layers.batch)
    by_blocks, _, _ = blocks.rule.step(blocks.network, blocks.params, blocks.state, blocks.batch)
    for key, update in by_blocks["model"].items():
        torch.testing.assert_close(by_layers["model"][key], update, rtol=1e-5, atol=1e-7, msg=key)
    # other projections give other hidden updates: the projections are what reaches the layers
    blocks.state["projections"] = {k: -d for k, d in blocks.state["projections"].items()}
    flipped, _, _ = blocks.rule.step(blocks.network, blocks.params, blocks.state, blocks.batch)
    assert not torch.allclose(flipped["model"]["blocks.0.layer.weight"], by_layers["model"]["blocks.0.layer.weight"])


def test_dfa_targets_is_a_declared_setting():
    spec = get_registry().rule("dfa")
    spec.check_options({"targets": "layers"})
    with pytest.raises(UserError, match="targets"):
        spec.check_options({"targets": "neurons"})
    layers = get_registry().rule("dfa").make(targets="layers", projection="conv")
    network = as_network(_resnet18(), SHAPE, (10,), "resnet18")
    with pytest.raises(UserError, match="projection=conv"):
        layers.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
