"""`--compile`: the rule's step under torch.compile gives eager's updates (float tolerance); a
step that does not compile, or compiles to different updates, warns once and runs eager."""

import json

import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core.compiled import CompiledStep, updates_mismatch
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, Trainer
from fa_rules.plugins import manager
from fa_rules.plugins.datasets import load_digits


def _setup(name, model="mlp"):
    rule = manager.build_registry(autoload=False).rule(name).make()
    torch.manual_seed(0)
    network = zoo.mlp((1, 8, 8), (10,), width=16) if model == "mlp" else zoo.lenet((1, 8, 8), (10,))
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    batches = [Batch(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), seed) for seed in (3, 4)]
    return rule, network, params, state, batches


# the feedback layers' Functions (LeNet: convolution and linear) compile too: traced under
# torch.func.grad, needs_input_grad once read False for their weights, and the compiled step gave
# zero weight gradients; the first call's check then fell back to eager
@pytest.mark.parametrize("name, model", [("backprop", "mlp"), ("feedback_alignment", "lenet")])
def test_compiled_updates_equal_eager(name, model, capsys):
    rule, network, params, state, batches = _setup(name, model)
    step = CompiledStep(name, rule.step)
    for batch in batches:  # the first call compiles (and checks), the second runs compiled alone
        compiled, _, metrics = step(network, params, state, batch)
        eager, _, eager_metrics = rule.step(network, params, state, batch)
        for key, e in eager["model"].items():
            torch.testing.assert_close(compiled["model"][key], e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(metrics["loss"], eager_metrics["loss"], rtol=1e-5, atol=0)
    err = capsys.readouterr().err
    assert step.compiled, err  # (not the eager fallback)
    assert f"compiled rule {name}'s step in" in err and step.compile_time_s > 0


def test_a_step_that_does_not_compile_warns_once_and_runs_eager(capsys, monkeypatch):
    calls = {"eager": 0, "compiled": 0}

    def step(network, params, state, batch):
        calls["eager"] += 1
        return {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}, state, {"loss": 0.0}

    def failing_compiled_step(*args):  # what a compiler error looks like from the caller
        calls["compiled"] += 1
        raise RuntimeError("unsupported thing\nwith details")

    monkeypatch.setattr(torch, "compile", lambda fn: failing_compiled_step)
    _, network, params, state, batches = _setup("backprop")
    compiled = CompiledStep("odd", step)
    for batch in batches:
        updates, _, _ = compiled(network, params, state, batch)
        assert all(torch.all(u == 0) for u in updates["model"].values())
    assert compiled.compiled is False and calls == {"eager": 2, "compiled": 1}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: rule odd does not compile (RuntimeError: unsupported thing); running eager"]


def test_a_compiled_step_with_other_updates_is_refused(capsys, monkeypatch):
    def step(network, params, state, batch):
        return {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}, state, {"loss": 0.0}

    def wrong_step(network, params, state, batch):  # e.g. a trace that lost a rule's feedback path
        return {"model": {k: torch.ones_like(v) for k, v in params["model"].items()}}, state, {"loss": 0.0}

    monkeypatch.setattr(torch, "compile", lambda fn: wrong_step)
    _, network, params, state, batches = _setup("backprop")
    compiled = CompiledStep("odd", step)
    updates, _, _ = compiled(network, params, state, batches[0])
    assert all(torch.all(u == 0) for u in updates["model"].values()) and compiled.compiled is False
    assert capsys.readouterr().err.startswith("warning: rule odd does not compile (compiled updates differ from eager at model/")


def test_updates_mismatch_names_the_update():
    a = {"model": {"w": torch.ones(3)}}
    assert updates_mismatch(a, {"model": {"w": torch.ones(3) * (1 + 1e-6)}}) is None
    assert updates_mismatch(a, {"model": {"w": torch.ones(3) * 1.01}}) == "compiled updates differ from eager at model/w"


def test_the_trainer_compiles_with_the_config_field_and_reports_the_time(tmp_path, capsys):
    eager = Trainer(TrainConfig(epochs=1, device="cpu", batch_size=256), manager.build_registry(autoload=False).rule("backprop").make(),
                    lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tmp_path / "eager", progress=False).run()
    trainer = Trainer(TrainConfig(epochs=1, device="cpu", batch_size=256, compile=True),
                      manager.build_registry(autoload=False).rule("backprop").make(),
                      lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tmp_path / "compiled", progress=False)
    summary = trainer.run()
    assert summary["compiled"] is True and summary["compile_time_s"] > 0
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["compile_time_s"] == summary["compile_time_s"]
    assert capsys.readouterr().err.count("compiled rule backprop's step in") == 1
    assert "compile_time_s" not in eager
    assert summary["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert summary["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=0.01)


def test_a_suite_setting_turns_compile_on_for_every_cell():
    from fa_rules.benchmark.cells import plan_cells
    from fa_rules.benchmark.suite import suite_from_dict

    suite = suite_from_dict({"rules": ["backprop", "feedback_alignment"], "settings": {"compile": True}})
    assert [c.config.compile for c in plan_cells(suite)] == [True, True]
    assert not any(c.config.compile for c in plan_cells(suite_from_dict({"rules": ["backprop"]})))


def test_the_train_command_takes_compile(tmp_path):
    from typer.testing import CliRunner

    from fa_rules.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--epochs", "1", "--width", "16", "--batch-size", "256", "-q",
                                      "--device", "cpu", "--compile", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "config.json").read_text())["compile"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] is True and summary["compile_time_s"] > 0


def test_the_benchmark_command_takes_compile(tmp_path):
    from typer.testing import CliRunner

    from fa_rules.cli.app import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "--rules", "backprop", "--epochs", "1", "--width", "16",
                                      "--batch-size", "256", "--device", "cpu", "--compile", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (run,) = (out / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["compile"] is True
    assert json.loads((run / "summary.json").read_text())["compiled"] is True


def test_a_rule_that_draws_noise_still_compiles_its_gradient():
    """The VAE draws its reparameterisation noise from the step's generator. Drawn inside the
    differentiated function, a generator breaks Dynamo's graph there and the whole gradient runs
    eager: no graph was captured, and the "compiled" step cost 1.24 x the eager one."""
    from torch._dynamo.utils import counters

    from fa_rules.plugins.manager import get_registry
    from fa_rules.testing import make_setup

    s = make_setup(get_registry().rules["vae"])
    torch._dynamo.reset()
    counters.clear()
    step = CompiledStep("vae", s.rule.step)
    second = Batch(s.batch.x.flip(0), s.batch.y, s.batch.seed + 1)
    for batch in (s.batch, second):
        compiled, _, _ = step(s.network, s.params, s.state, batch)
        eager, _, _ = s.rule.step(s.network, s.params, s.state, batch)
        for group, tensors in eager.items():
            for key, e in tensors.items():
                torch.testing.assert_close(compiled[group][key], e, rtol=1e-4, atol=1e-6)
    assert step.compiled
    assert counters["stats"]["unique_graphs"] >= 1
