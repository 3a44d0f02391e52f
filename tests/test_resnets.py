"""Any model: residual blocks, layer-level feedback inside any block, the new model zoo, plain-factory
models from plugins, structural refusals, and the suites that ask whether the rules scale."""

import importlib.util
import math
import pickle
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import UserError
from fa_rules.core.feedback import chained_feedback_gradients, feedback_call, feedback_weight_keys
from fa_rules.core.metrics import backprop_gradient
from fa_rules.core.rule import Batch
from fa_rules.plugins import manager
from fa_rules.plugins.manager import build_registry

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = build_registry(autoload=False)
CHAINED = ("feedback_alignment", "sign_symmetry", "kolen_pollack", "brsf", "frsf", "bidirectional_fa",
           "weight_mirror")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FA_COSTS = _load(ROOT / "benchmarks" / "fa_costs.py", "fa_costs")  # keeps the old mechanism


def _batch(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g), seed)


def _step(rule_name, network, batch, old=False, **options):
    rule = REGISTRY.rule(rule_name).make(**options)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    if old:
        with FA_COSTS.old_mechanism():
            return rule.step(network, params, state, batch)[0]
    return rule.step(network, params, state, batch)[0]


# -- the layer Functions against the old mechanism --------------------------------------------------
@pytest.mark.parametrize("rule_name", CHAINED)
@pytest.mark.parametrize("model", ["mlp", "lenet", "biotorch_lenet"])
def test_layer_functions_give_the_old_mechanisms_updates(rule_name, model):
    torch.manual_seed(0)
    network = REGISTRY.model(model).make((1, 8, 8), (10,), **({"width": 24} if model == "mlp" else {}))
    new, old = _step(rule_name, network, _batch((1, 8, 8))), _step(rule_name, network, _batch((1, 8, 8)), old=True)
    for group in old:
        assert new[group].keys() == old[group].keys()
        for k in old[group]:
            torch.testing.assert_close(new[group][k], old[group][k], rtol=1e-5, atol=1e-6, msg=f"{group} {k}")


def test_feedback_call_is_the_same_under_plain_autograd_and_torch_func():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.ConvTranspose2d(3, 2, 3, 2, 1, 1),
                           nn.Conv2d(2, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2 * 8 * 8, 5))
    params = {k: v.detach() for k, v in module.named_parameters()}
    feedback = {k: torch.randn_like(v) for k, v in params.items() if k.endswith("weight")}
    x = torch.randn(4, 2, 8, 8)

    def loss(p, x):
        return feedback_call(module, p, (x,), feedback).square().sum()

    by_func = torch.func.grad(loss, argnums=(0, 1))(params, x)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xl = x.clone().requires_grad_()
    by_autograd = torch.autograd.grad(loss(leaves, xl), [*leaves.values(), xl])
    for a, b in zip([*by_func[0].values(), by_func[1]], by_autograd):
        torch.testing.assert_close(a, b)
    # the input gradient went through the feedback: it differs from backprop's
    backprop_x = torch.func.grad(lambda x: torch.func.functional_call(module, params, (x,)).square().sum())(x)
    assert not torch.allclose(by_func[1], backprop_x)


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_direct_layer_routing_equals_the_function_mode_and_puts_the_layers_back(model, monkeypatch):
    import fa_rules.core.feedback as fb

    torch.manual_seed(0)
    network = REGISTRY.model(model).make((1, 8, 8), (10,), **({"width": 24} if model == "mlp" else {}))
    params = network.init_params()
    feedback = {k: torch.randn_like(v) for k, v in params.items() if k.endswith("weight") and k != "blocks.0.layer.weight"}
    assert fb._direct_routes(network, feedback) is not None  # every routed layer is a plain one
    x = torch.rand(4, 1, 8, 8)

    def grads():
        return torch.func.grad(lambda p: feedback_call(network, p, (x,), feedback).square().sum())(params)

    direct = grads()
    monkeypatch.setattr(fb, "_direct_routes", lambda module, feedback: None)
    by_mode = grads()
    for k in params:
        assert torch.equal(direct[k], by_mode[k]), k
    monkeypatch.undo()
    layers = [b.layer for b in network.blocks]
    assert not any("forward" in vars(layer) for layer in layers)
    with pytest.raises(RuntimeError):  # a failing call leaves no replaced forward behind either
        feedback_call(network, params, (torch.rand(4, 3, 5, 5),), feedback)
    assert not any("forward" in vars(layer) for layer in layers)


def _routing_network(model: str):
    if model != "custom":
        return REGISTRY.model(model).make((1, 8, 8), (10,), **({"width": 24} if model == "mlp" else {}))
    from fa_rules.core.network import Block, Network
    return Network([  # "same" padding with an even kernel, no biases, a Linear on 3-d input (batch, 4, 48)
        Block(nn.Conv2d(1, 3, 4, padding="same", bias=False), nn.ReLU(), in_shape=(1, 8, 8)),
        Block(nn.Conv2d(3, 3, 3, padding="same"), nn.Tanh()),
        Block(nn.Linear(48, 10, bias=False), nn.Tanh(), in_shape=(4, 48)),
        Block(nn.Linear(40, 10), in_shape=(40,)),
    ], in_shape=(1, 8, 8), out_shape=(10,))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("model", ["mlp", "lenet", "custom"])
def test_saved_tensor_routing_gives_the_feedback_functions_gradients(model, monkeypatch):
    """Under plain autograd at first order, routed layers run their own forward with the feedback
    tensor saved in the weight's place; the gradients are those of the autograd Functions."""
    import fa_rules.core.feedback as fb
    from fa_rules.core import autodiff

    torch.manual_seed(0)
    network = _routing_network(model)
    params = network.init_params()
    feedback = {k: torch.randn_like(v) for k, v in params.items() if k.endswith("weight") and k != "blocks.0.layer.weight"}
    x = torch.rand(4, 1, 8, 8)

    def loss(p):
        return feedback_call(network, p, (x,), feedback).square().sum()

    packs = []

    class Spy(fb._SaveFeedback):
        __slots__ = ()

        def __init__(self, *args):
            super().__init__(*args)
            packs.append(self)

    monkeypatch.setattr(fb, "_SaveFeedback", Spy)
    by_hooks = autodiff.grad(loss)(params)
    routed = [p.routed for p in packs]
    # every routed layer saved its feedback tensor; the Linear on 3-d input may fall back to a Function
    assert len(routed) == len(feedback) and (all(routed) if model != "custom" else sum(routed) >= 2)
    monkeypatch.setattr(fb, "first_order", lambda: False)
    by_functions = autodiff.grad(loss)(params)
    by_transform = torch.func.grad(loss)(params)
    backprop = autodiff.grad(lambda p: fb.call_with(network, p, (x,)).square().sum())(params)
    for k in params:
        torch.testing.assert_close(by_hooks[k], by_functions[k], msg=k)
        torch.testing.assert_close(by_hooks[k], by_transform[k], msg=k)
    assert not torch.allclose(by_hooks["blocks.0.layer.weight"], backprop["blocks.0.layer.weight"])
    assert not any("forward" in vars(layer) for layer in network.modules())


# -- a residual network against an independent implementation --------------------------------------
def _substituted(op, x, weight, bias, feedback, **geometry):
    """Plain autograd: the value of op(x; W, b), its input derivative through `feedback`."""
    if feedback is None:
        return op(x, weight, bias, **geometry)
    return op(x.detach(), weight, bias, **geometry) + op(x - x.detach(), feedback, None, **geometry)


def _reference_resnet_forward(network, p, fb, x):
    """ResNet-8 written out op by op (stem, residual units with option-B projections, readout)."""
    def conv(prefix, h, module):
        return _substituted(F.conv2d, h, p[f"{prefix}.weight"], p.get(f"{prefix}.bias"), fb.get(f"{prefix}.weight"),
                            stride=module.stride, padding=module.padding)

    def bn(prefix, h):
        return F.batch_norm(h, None, None, p[f"{prefix}.weight"], p[f"{prefix}.bias"], training=True)

    stem = network.blocks[0]
    h = torch.relu(bn("blocks.0.1", conv("blocks.0.0", x, stem[0])))
    for i in range(1, network.num_blocks - 1):
        unit, at = network.blocks[i], f"blocks.{i}"
        out = torch.relu(bn(f"{at}.bn1", conv(f"{at}.conv1", h, unit.conv1)))
        out = bn(f"{at}.bn2", conv(f"{at}.conv2", out, unit.conv2))
        skip = h if isinstance(unit.shortcut, nn.Identity) else bn(f"{at}.shortcut.1", conv(f"{at}.shortcut.0", h, unit.shortcut[0]))
        h = torch.relu(out + skip)
    last = f"blocks.{network.num_blocks - 1}.2"
    h = h.mean((2, 3))
    return _substituted(F.linear, h, p[f"{last}.weight"], p[f"{last}.bias"], fb.get(f"{last}.weight"))


def test_fa_update_in_residual_blocks_equals_plain_autograd_with_feedback_per_layer():
    torch.manual_seed(0)
    network = REGISTRY.model("resnet").make((1, 8, 8), (10,), depth=8, width=4, shortcut="B")
    rule = REGISTRY.rule("feedback_alignment").make()
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    feedback = state["feedback"]
    # every conv inside the units, the projections and the readout get a feedback tensor
    assert "blocks.2.shortcut.0.weight" in feedback and "blocks.1.conv2.weight" in feedback and "blocks.4.2.weight" in feedback
    batch = _batch((1, 8, 8))
    updates = rule.step(network, params, state, batch)[0]["model"]
    leaves = {k: v.clone().requires_grad_() for k, v in params["model"].items()}
    loss = F.cross_entropy(_reference_resnet_forward(network, leaves, feedback, batch.x), batch.y)
    reference = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    assert updates.keys() == reference.keys()
    for k in reference:  # conv and Linear weights, biases and batch norm: the true local gradients
        torch.testing.assert_close(updates[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.allclose(updates["blocks.1.conv1.weight"],
                              backprop_gradient(network, params["model"], batch)["blocks.1.conv1.weight"])


@pytest.mark.parametrize("model", ["resnet20", "vgg", "lenet"])
def test_feedback_equal_to_the_forward_weights_is_backprop_exactly(model):
    torch.manual_seed(0)
    network = REGISTRY.model(model).make((3, 8, 8), (10,))
    p, batch = network.init_params(), _batch((3, 8, 8))
    grads, _ = chained_feedback_gradients(network, p, batch.x, batch.y, {k: p[k] for k in feedback_weight_keys(network)})
    reference = backprop_gradient(network, p, batch)
    for k in reference:
        torch.testing.assert_close(grads[k], reference[k], rtol=1e-6, atol=1e-7, msg=k)


# -- the zoo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
@pytest.mark.parametrize("model,options", [("resnet20", {}), ("resnet20", {"shortcut": "B"}), ("resnet32", {}),
                                           ("resnet56", {}), ("vgg", {})])
def test_zoo_builds_for_every_dataset_shape(model, options, shape):
    network = REGISTRY.model(model).make(shape, (10,), **options)
    assert network.apply(network.init_params(), torch.rand(2, *shape)).shape == (2, 10)


def test_resnet_depths_and_parameter_counts_follow_he_et_al():
    counts = {}
    for depth in (20, 32, 56):
        network = REGISTRY.model(f"resnet{depth}").make((3, 32, 32), (10,))
        convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) + 1 == depth and network.num_blocks == (depth - 2) // 2 + 2  # stem, 3n units, readout
        counts[depth] = sum(p.numel() for p in network.parameters())
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M parameters (option A)
    assert [round(counts[d] / 1e6, 2) for d in (20, 32, 56)] == [0.27, 0.46, 0.85]
    with pytest.raises(UserError, match="6n \\+ 2"):
        REGISTRY.model("resnet").make((3, 32, 32), (10,), depth=21)


# -- rules that need what a model lacks ---------------------------------------------------------
@pytest.mark.parametrize("rule_name,missing", [
    ("indirect_feedback_alignment", "one layer per block to send the error forward through"),
    ("bidirectional_fa", "one layer per block to run the network backwards through"),
    ("weight_mirror", "one layer per block to drive with mirror noise"),
    ("local_fa", "invertible blocks"),
    ("dtp", "an invertible block"),
])
def test_rules_refuse_a_residual_network_in_one_line_naming_what_is_missing(rule_name, missing):
    network = REGISTRY.model("resnet").make((1, 8, 8), (10,), depth=8, width=4)
    rule = REGISTRY.rule(rule_name).make()
    with pytest.raises(UserError) as info:
        rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    message = str(info.value)
    assert missing in message and "block 0 is a Sequential" in message and "\n" not in message


# -- training from the CLI ----------------------------------------------------------------------------
def _train(*args):
    result = CliRunner().invoke(app, ["train", *args, "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("rule_name", ["backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack", "brsf",
                                       "frsf", "dfa", "drtp", "bidirectional_dfa"])
def test_resnet20_trains_from_the_cli(tmp_path, rule_name):
    import json

    out = tmp_path / "run"
    _train("--rule", rule_name, "--model", "resnet20", "--model-opt", "width=4", "--dataset", "digits",
           "--epochs", "1", "--batch-size", "256", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "resnet20" and math.isfinite(summary["test_loss"])


def _example_entry_point():
    """The example plugin's entry point, read from its pyproject (the module imported by path)."""
    folder = ROOT / "examples" / "resnet-plugin"
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"]
    ((name, value),) = project["project"]["entry-points"]["fa_rules"].items()
    return folder, name, value


def test_the_resnet_plugin_example_trains_with_sign_symmetry_through_the_cli(tmp_path, monkeypatch):
    import json

    folder, name, value = _example_entry_point()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, value, raising=False)
    entry = metadata.EntryPoint(name=name, value=value, group=manager.ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr(manager.metadata, "entry_points",
                        lambda group=None, **kw: [entry] if group == manager.ENTRY_POINT_GROUP else real(group=group, **kw))
    monkeypatch.setattr(manager, "_cached", None)
    out = tmp_path / "run"
    _train("--rule", "sign_symmetry", "--model", "my_resnet", "--model-opt", "width=8", "--model-opt", "units=1",
           "--dataset", "digits", "--epochs", "2", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_options"] == {"width": 8, "units": 1}
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]  # it learns
    spec = manager.get_registry().model("my_resnet")
    assert spec.options == {"width": 16, "units": 2, "blocks": ""} and "residual" in spec.summary
    network = spec.make((1, 8, 8), (10,), width=8, units=1)
    assert network.num_blocks == 3 and "blocks.1.conv1.weight" in feedback_weight_keys(network)
    monkeypatch.setattr(manager, "_cached", None)


def test_a_plain_factory_may_return_any_module_and_a_non_module_is_one_line():
    from fa_rules.core.network import ModelSpec

    def single(in_shape, out_shape):
        return nn.Linear(3, 3)

    def running(in_shape, out_shape):
        return nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), nn.Sequential(nn.Flatten(), nn.LazyLinear(10)))

    def not_a_module(in_shape, out_shape):
        return 3

    network = ModelSpec.from_factory(single).make((1, 8, 8), (10,))
    assert network.num_blocks == 1 and "0 top-level children" in network.split_note
    network = ModelSpec.from_factory(running).make((1, 8, 8), (10,))
    assert [name for name, _ in network.tracked_norms] == ["blocks.0.1"]  # running statistics, carried by the engine
    with pytest.raises(UserError, match=r"^model 'not_a_module' returned a int, not an nn.Module$"):
        ModelSpec.from_factory(not_a_module).make((1, 8, 8), (10,))


# -- the scaling suites -------------------------------------------------------------------------------
def _write_cifar(folder: Path, per_batch: int = 8):
    """A CIFAR-10-format file set (pickled dicts of uint8 rows and labels), tiny."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (per_batch,), generator=g).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)


def test_cifar10_resnet20_quick_suite_runs_on_a_cifar_format_file_set(tmp_path):
    import json

    # 2 images per file: the suite checks the machinery, and 8 ResNet-20s train on 10 images at half the cost of 40
    _write_cifar(tmp_path / "data" / "cifar-10-batches-py", per_batch=2)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ROOT / "benchmarks" / "cifar10_resnet20.toml"), "--quick",
                                      "--data-dir", str(tmp_path / "data"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((out / "results.json").read_text())
    assert {r["rule"] for r in rows} >= {"backprop", "feedback_alignment", "usf", "kolen_pollack"}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert "32.16" in (out / "report.md").read_text() or "0.3216" in (out / "report.md").read_text()
