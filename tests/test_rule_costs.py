"""benchmarks/rule_costs.py prints one Markdown table: rule rows with ratios to their reference and
engine/plain rows (a smoke run of two steps, not a timing)."""

import re
import sys
from pathlib import Path

import pytest
from script_runner import run_script

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def test_rule_costs_prints_ratios_to_each_tasks_reference():
    result = run_script(BENCHMARKS / "rule_costs.py", "--steps", "1", "--warmup", "1", "--models", "tiny_mlp",
                        "--rules", "backprop,feedback_alignment,ae,dtp,feature_alignment")
    assert result.returncode == 0, result.stderr
    rows = {m[1]: m for m in re.findall(r"^\| (tiny_mlp) \| (\w+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                                        result.stdout, re.M)}
    assert set(rows) == {"backprop", "feedback_alignment", "ae", "dtp", "feature_alignment"}
    assert rows["backprop"][5] == "1.00" and rows["ae"][5] == "1.00"  # each reference against itself
    assert rows["feature_alignment"][2] == "reconstruct" and rows["dtp"][2] == "classify"
    # CPU and wall time both shown; the ratios say their clock
    assert "| CPU ms/step | wall ms/step | × reference (CPU) |" in result.stdout
    assert "ratios of thread CPU time" in result.stdout
    engine_row = r"\| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$"
    assert re.search(r"^\| tiny_mlp \(batch 8\) " + engine_row, result.stdout, re.M)
    assert re.search(r"^\| lenet \(batch 64\) " + engine_row, result.stdout, re.M)


def test_a_cuda_device_without_cuda_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is taken, not refused")
    result = run_script(BENCHMARKS / "rule_costs.py", "--device", "cuda")
    assert result.returncode == 2 and "--device cuda: no CUDA device on this machine" in result.stderr


def test_feedback_function_floor_prints_one_ratio_per_round():
    result = run_script(BENCHMARKS / "feedback_function_floor.py", "--width", "16", "--depth", "2", "--batch", "4",
                        "--steps", "3", "--rounds", "2")
    assert result.returncode == 0, result.stderr
    ratios = [float(r) for r in re.findall(r"^round \d: .* ratio ([\d.]+)$", result.stdout, re.M)]
    assert len(ratios) == 2 and all(r > 0 for r in ratios), result.stdout  # a smoke run, not a timing


# -- benchmarks/biotorch_costs.py: the same rules in BioTorch -------------------------------------
def test_biotorch_costs_without_biotorch_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "biotorch", None)  # the import fails as if BioTorch were not installed
    result = run_script(BENCHMARKS / "biotorch_costs.py", "--steps", "1")
    assert result.returncode == 2 and "BioTorch is not installed" in result.stderr


# BioTorch's own requirements (Jupyter, TensorBoard, ...) keep it out of the [test] extra; CI installs it
@pytest.mark.needs_package("BioTorch", "pip install --no-deps biotorch==0.0.16", module="biotorch")
def test_biotorch_costs_prints_both_libraries_ratios():
    result = run_script(BENCHMARKS / "biotorch_costs.py", "--steps", "1", "--warmup", "1", "--models", "lenet")
    assert result.returncode == 0, result.stderr
    number = r"([\d.]+)"
    rows = re.findall(rf"^\| lenet \| ([\w =]+) \| {number} \| {number} \| ([\w()]+(?: loop\))?) \| {number} \| "
                      rf"{number} \| {number} \|$", result.stdout.replace("(plain loop)", "plain"), re.M)
    assert {r[0] for r in rows} == {"backprop", "feedback_alignment", "direct_feedback_alignment",
                                    "sign_symmetry magnitude=xavier", "brsf", "frsf"}
    modes = {r[0]: r[3] for r in rows}
    assert modes["feedback_alignment"] == "fa" and modes["sign_symmetry magnitude=xavier"] == "usf"
    assert all(float(r[1]) > 0 and float(r[4]) > 0 for r in rows)


# -- the engine's direct fused-Adam step against torch.optim's own ------------------------------------
def _adam_pair(**options):
    import torch

    from fa_rules.core.config import TrainConfig
    from fa_rules.core.trainer import make_optimizers

    g = torch.Generator().manual_seed(0)
    shapes = {"w": (7, 5), "b": (7,), "v": (3, 7)}
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    twin = {k: v.clone() for k, v in params.items()}
    config = TrainConfig(**options)
    return params, twin, make_optimizers(config, {"model": params}), make_optimizers(config, {"model": twin}), g


def _grouped_adam_pair(shapes: dict, config, seed: int):
    """Random parameter groups of `shapes` ({group: {key: shape}}), an untouched twin, and each's
    optimisers for `config`."""
    import torch

    from fa_rules.core.trainer import make_optimizers

    g = torch.Generator().manual_seed(seed)
    params = {grp: {k: torch.randn(s, generator=g) for k, s in keys.items()} for grp, keys in shapes.items()}
    twin = {grp: {k: v.clone() for k, v in ts.items()} for grp, ts in params.items()}
    return params, twin, make_optimizers(config, params), make_optimizers(config, twin), g


def test_direct_fused_adam_step_is_torch_optims_step_to_the_bit(monkeypatch):
    import torch

    from fa_rules.core import trainer as trainer_module
    from fa_rules.core.rule import Rule

    rule = Rule(init=lambda *a: None, step=lambda *a: None)
    params, twin, fast, plain, g = _adam_pair(lr=3e-3, weight_decay=1e-2)
    direct = []
    original = trainer_module._direct_adam_calls
    for step in range(6):
        updates = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        if step == 3:  # a schedule's new rate reaches the kernel
            for opt in (*fast.values(), *plain.values()):
                opt.param_groups[0]["lr"] = 1e-3
        monkeypatch.setattr(trainer_module, "_direct_adam_calls",
                            lambda *a: direct.append(original(*a) is not None) or original(*a))
        trainer_module.apply_updates(rule, {"model": params}, {"model": updates}, fast)
        monkeypatch.setattr(trainer_module, "_direct_adam_calls", lambda *a: None)
        trainer_module.apply_updates(rule, {"model": twin}, {"model": {k: u.clone() for k, u in updates.items()}}, plain)
        for k in params:
            assert torch.equal(params[k], twin[k]), (step, k)
            assert params[k].grad is None
    # the first step makes the state (torch.optim's own step); every later one is direct
    assert direct == [False] + [True] * 5
    fast_state = fast["model"].state_dict()["state"]
    plain_state = plain["model"].state_dict()["state"]
    for i in plain_state:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fast_state[i][name], plain_state[i][name]), (i, name)


def test_declared_weight_decay_is_the_decay_term_added_to_the_update(monkeypatch):
    """Two groups stepped directly in merged kernel calls, a declared decay added in the kernel,
    against torch.optim stepping `update + lambda p` group by group (the rule adding it itself)."""
    import torch

    from fa_rules.core import trainer as trainer_module
    from fa_rules.core.config import TrainConfig
    from fa_rules.core.rule import Rule

    shapes = {"model": {"w": (7, 5), "b": (7,)}, "feedback": {"w": (7, 5)}}
    params, twin, fast, plain, g = _grouped_adam_pair(shapes, TrainConfig(lr=3e-3, weight_decay=1e-2), seed=3)
    decay = {"model": {"w": 0.25}, "feedback": {"w": 0.25}}
    rule = Rule(init=lambda *a: None, step=lambda *a: None, weight_decay=lambda network, params: decay)
    bare = Rule(init=lambda *a: None, step=lambda *a: None)
    assert trainer_module.declared_weight_decay("r", rule, None, params) == decay
    calls = []
    for step in range(6):
        shared = torch.randn(7, 5, generator=g)  # one tensor for W and B, as Kolen-Pollack returns
        updates = {"model": {"w": shared, "b": torch.randn(7, generator=g)}, "feedback": {"w": shared}}
        with monkeypatch.context() as m:
            m.setattr(torch, "_fused_adam_",
                      lambda *a, _f=torch._fused_adam_, **kw: calls.append(kw["weight_decay"]) or _f(*a, **kw))
            trainer_module.apply_updates(rule, params, updates, fast, decay)
        full = {grp: {k: u + decay.get(grp, {}).get(k, 0.0) * twin[grp][k] for k, u in us.items()}
                for grp, us in updates.items()}
        with monkeypatch.context() as m:
            m.setattr(trainer_module, "_direct_adam_calls", lambda *a: None)
            trainer_module.apply_updates(bare, twin, full, plain)
        for grp in params:
            for k in params[grp]:
                assert torch.allclose(params[grp][k], twin[grp][k], rtol=1e-6, atol=1e-7), (step, grp, k)
    # step 1 is torch.optim's, one kernel call per group; the others take one call per weight decay
    # across both groups
    assert calls[:2] == [1e-2, 1e-2]
    assert sorted(calls[2:]) == sorted([1e-2, 1e-2 + 0.25] * 5)
    with pytest.raises(ValueError, match="declares weight decay"):
        trainer_module.apply_updates(rule, params, updates, fast)


def test_groups_sharing_one_kernel_call_step_as_their_own_optimisers_do(monkeypatch):
    """Three groups, two with the same settings (one kernel call) and one with its own rate: to the
    bit what each group's torch.optim step gives."""
    import torch

    from fa_rules.core import trainer as trainer_module
    from fa_rules.core.config import TrainConfig
    from fa_rules.core.rule import Rule

    shapes = {"model": {"w": (6, 4), "b": (6,)}, "feedback": {"w": (6, 4)}, "decoder": {"w": (4, 6)}}
    config = TrainConfig(lr=2e-3, group_lr={"decoder": 5e-3})
    params, twin, fast, plain, g = _grouped_adam_pair(shapes, config, seed=5)
    rule = Rule(init=lambda *a: None, step=lambda *a: None)
    calls = []
    for step in range(5):
        updates = {grp: {k: torch.randn(v.shape, generator=g) for k, v in ts.items()} for grp, ts in params.items()}
        with monkeypatch.context() as m:
            m.setattr(torch, "_fused_adam_", lambda *a, _f=torch._fused_adam_, **kw: calls.append(len(a[0])) or _f(*a, **kw))
            trainer_module.apply_updates(rule, params, updates, fast)
        with monkeypatch.context() as m:
            m.setattr(trainer_module, "_direct_adam_calls", lambda *a: None)
            trainer_module.apply_updates(rule, twin, updates, plain)
        for grp in params:
            for k in params[grp]:
                assert torch.equal(params[grp][k], twin[grp][k]), (step, grp, k)
    # the first step is torch.optim's, a call per group; then model and feedback share one call
    assert calls[:3] == [2, 1, 1] and sorted(calls[3:]) == sorted([3, 1] * 4)


def test_direct_fused_adam_step_declines_what_it_does_not_do():
    import torch

    from fa_rules.core.trainer import _direct_adam_calls

    params, _, fast, _, g = _adam_pair()
    opt = fast["model"]
    updates = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    assert _direct_adam_calls(opt, params, updates, {}) is None  # no state yet
    for k, u in updates.items():
        params[k].grad = u
    opt.step()
    assert _direct_adam_calls(opt, params, updates, {}) is not None
    assert _direct_adam_calls(opt, params, {"w": updates["w"]}, {}) is None  # an update missing
    for setting in ("amsgrad", "maximize"):
        opt.param_groups[0][setting] = True
        assert _direct_adam_calls(opt, params, updates, {}) is None, setting
        opt.param_groups[0][setting] = False
    handle = opt.register_step_post_hook(lambda *a: None)
    assert _direct_adam_calls(opt, params, updates, {}) is None
    handle.remove()
    sgd = torch.optim.SGD(list(params.values()), lr=0.1)
    assert _direct_adam_calls(sgd, params, updates, {}) is None


# -- benchmarks/own_arithmetic.py: the rules' own work, without their routing ---------------------------
def test_own_arithmetic_prints_each_stand_in_beside_its_rule():
    result = run_script(BENCHMARKS / "own_arithmetic.py", "--models", "tiny_mlp", "--steps", "2", "--warmup", "1")
    assert result.returncode == 0, result.stderr
    rows = {m[0]: m[1:] for m in re.findall(r"^\| tiny_mlp \| ([\w +()=,']+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]*) \|$",
                                            result.stdout, re.M)}  # CPU ms, wall ms, ratio (CPU), prediction
    assert set(rows) == {"backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack",
                         "backprop + sign feedback", "backprop + trained copy",
                         "backprop, written out (FA's loop, B = W)", "sign_symmetry (magnitude=unit)"}, result.stdout
    assert rows["backprop"][2] == "1.00" and rows["backprop + trained copy"][3]  # a smoke run, not a timing


def test_the_kolen_pollack_stand_in_trains_its_copy_as_kolen_pollack_trains_b():
    """The stand-in's copy gets the routed weights' gradients and the decay: with B = W at the start
    and SGD, the copy follows W exactly (what Kolen-Pollack's B does when its feedback equals W)."""
    import importlib.util

    import torch

    from fa_rules import models as zoo
    from fa_rules.core.config import TrainConfig
    from fa_rules.core.rule import Batch
    from fa_rules.core.trainer import apply_updates, declared_weight_decay, make_optimizers

    spec = importlib.util.spec_from_file_location("own_arithmetic", ROOT / "benchmarks" / "own_arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rule = module.backprop_training_a_copy(decay=0.1)
    net = zoo.mlp((1, 8, 8), (10,), depth=2, width=16)
    params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(0))
    assert set(params["feedback"]) == {"blocks.1.layer.weight", "blocks.2.layer.weight"}
    for k, b in params["feedback"].items():
        b.copy_(params["model"][k])
    optimizers = make_optimizers(TrainConfig(optimizer="sgd", momentum=0.0, lr=0.5), params)
    decay = declared_weight_decay("copy", rule, net, params)
    batch = Batch(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    before = params["model"]["blocks.1.layer.weight"].clone()
    for _ in range(3):
        updates, state, _ = rule.step(net, params, state, batch)
        apply_updates(rule, params, updates, optimizers, decay)
    for k, b in params["feedback"].items():
        assert torch.allclose(b, params["model"][k], atol=1e-6), k
    assert not torch.allclose(before, params["model"]["blocks.1.layer.weight"])


# -- benchmarks/engine_overhead.py: the engine against an independent plain loop ------------------------
def _engine_overhead():
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_overhead", ROOT / "benchmarks" / "engine_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model, options", [("mlp", {"depth": 1, "width": 16}), ("lenet", {})])
def test_the_plain_baseline_is_its_own_module_stepping_as_the_engine_steps(model, options):
    """The baseline is a hand-written nn.Sequential (none of the engine's modules), from the engine's
    weights: the same outputs, and after one step of each on the same batch the same weights."""
    import torch

    from fa_rules.benchmark.timing import StepTime, batch_index, example_order, trainer_stepper
    from fa_rules.core.trainer import TrainConfig, Trainer
    from fa_rules.runs import resolve

    config = TrainConfig(rule="backprop", dataset="digits", model=model, model_options=options, batch_size=16,
                         device="cpu")
    rule, dataset, build_network = resolve(config)
    trainer = Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False)
    eo = _engine_overhead()
    plain = eo.plain_copy(trainer)
    assert type(plain) is torch.nn.Sequential
    assert all(type(m).__module__.startswith("torch.nn") for m in plain.modules())
    x = trainer.make_batch(batch_index(example_order(trainer, 0), 0, 16), 0).x
    assert torch.allclose(plain(x), trainer.network.apply(trainer.params["model"], x), atol=1e-6)

    order = example_order(trainer, 0)
    plain_step = eo.plain_stepper(trainer, order)  # its own copy, from the weights before the step
    for step in (trainer_stepper(trainer, order), plain_step):
        assert isinstance(step(0), StepTime)
    for p, w in zip(plain_step.module.parameters(), trainer.params["model"].values()):
        assert torch.allclose(p, w, atol=1e-6)
    assert not torch.equal(next(plain_step.module.parameters()), next(plain.parameters()))  # and it did step


def test_the_autodiff_flattening_shortcut_matches_pytrees():
    """The engine's `grad` takes parameter groups apart without pytree's generic walk (a tenth of a
    tiny step); the leaves, their order and the rebuilt structure are pytree's."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from fa_rules.core.autodiff import _flatten, _unflatten

    t = [torch.full((1,), float(i)) for i in range(4)]
    for tree in ({"model": {"b": t[0], "a": t[1]}, "feedback": {"w": t[2]}}, {"z": t[0], "y": t[1]},
                 {"model": {"a": t[0]}, "extra": [t[1], t[2]]}, (t[0], {"a": t[1]}), {"g": {"a": t[0], "n": None}}):
        leaves, spec = _flatten(tree)
        reference, reference_spec = tree_flatten(tree)
        assert [id(x) for x in leaves] == [id(x) for x in reference]
        rebuilt = _unflatten(t[3:] * len(leaves), spec)
        assert repr(rebuilt) == repr(tree_unflatten(t[3:] * len(leaves), reference_spec))
