"""Every registered rule on every kind of model: it trains (a finite loss) or refuses in one line.

The models are the kinds a user brings: a torchvision design by name (resnet18, on 8x8 digits through
the input adapter; MobileNetV3 runs in the torchvision suite's quick form), a module of one's own that holds raw `nn.Parameter`s and calls
`F.conv2d` / `F.linear` (no submodules: torch.fx finds no split point, so it is one block), and a plain
`nn.Sequential` with a batch norm that keeps running statistics and a dropout. The rules are all of
`get_registry().rules`, built-ins and the example plugins. To stay fast, digits is cut to 64 training
and 64 test images (two steps of 32) and runs draw no pictures."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import fa_rules
from fa_rules.cli.app import app
from fa_rules.core import trainer as trainer_module
from fa_rules.core.config import TrainConfig
from fa_rules.core.data import Dataset
from fa_rules.core.errors import UserError
from fa_rules.core.feedback import feedback_weight_keys
from fa_rules.plugins.manager import get_registry
from fa_rules.runs import model_name, new_trainer
from test_cli_errors import run_main

EXAMPLES = 32
BATCH = 32  # one step per run: the first update already tells a rule from backprop
# rules whose feedback reaches any linear map or convolution, wherever a module calls it
EVERYWHERE = ("backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack", "frsf", "brsf")
# rules that project the error to each block's output: they need a chain of blocks
BLOCK_LEVEL = ("direct_feedback_alignment", "direct_random_target_projection")


class FunctionalNet(nn.Module):
    """Raw parameters and functional calls only: conv 3x3 -> relu -> 2x2 max pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(6, 1, 3, 3) / 3)
        self.conv_bias = nn.Parameter(torch.zeros(6))
        self.out_weight = nn.Parameter(torch.randn(10, 6 * 4 * 4) / math.sqrt(6 * 4 * 4))
        self.out_bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        h = F.max_pool2d(torch.relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=1)), 2)
        return F.linear(h.flatten(1), self.out_weight, self.out_bias)


# one instance, handed over as it is: every network built is a copy of it
SEQUENTIAL = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=True), nn.ReLU(),
                           nn.Dropout(0.1), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
MODELS = {"resnet18": "torchvision:resnet18",
          "functional": FunctionalNet, "sequential": SEQUENTIAL}

# Block-level rules on a Sequential with parameter-free blocks (ReLU, Dropout, Flatten): such a block
# has nothing to train, and the one-backward routings must give it zeros, not torch's "does not require grad"
BLOCK_RULES = ("direct_feedback_alignment", "direct_random_target_projection", "bidirectional_dfa")


@pytest.fixture(scope="module")
def tiny_digits():
    """digits, as the registry loads it for every run (CLI included), cut to 64 + 64 images."""
    registry = get_registry()
    spec = registry.datasets["digits"]
    full = spec.load(None)
    small = Dataset("digits", full.train_x[:EXAMPLES], full.train_y[:EXAMPLES], full.test_x[:EXAMPLES],
                    full.test_y[:EXAMPLES], full.num_classes)
    patch = pytest.MonkeyPatch()
    patch.setitem(registry.datasets, "digits", dataclasses.replace(spec, load=lambda data_dir=None: small))
    yield small
    patch.undo()


@dataclasses.dataclass
class Outcome:
    summary: dict | None = None
    trainer: object = None
    refusal: str | None = None
    crash: str | None = None


def _run(rule: str, model: str, out_dir) -> Outcome:
    """One epoch of `rule` on `model` (a registered name); a refusal or a crash is kept, not raised."""
    config = TrainConfig(rule=rule, dataset="digits", model=model, epochs=1, batch_size=BATCH, device="cpu")
    try:
        trainer = new_trainer(config, out_dir, progress=False)
        trainer.on_finish.clear()  # no pictures: they cost more than the run
        return Outcome(summary=trainer.run(), trainer=trainer)
    except UserError as e:
        return Outcome(refusal=str(e))
    except Exception as e:  # noqa: BLE001 - a crash is what the test reports
        return Outcome(crash=f"{type(e).__name__}: {str(e)[:300]}")


def _trained(outcome: Outcome) -> bool:
    return outcome.summary is not None


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_rule_trains_or_refuses_in_one_line(kind, tiny_digits, tmp_path, monkeypatch):
    # no checkpoint files: a resnet18's with its optimiser state is ~180 MB a run (the CLI run below writes one)
    monkeypatch.setattr(trainer_module, "save_checkpoint", lambda path, payload: None)
    registry = get_registry()
    model = model_name(MODELS[kind])
    outcomes = {}
    for rule in registry.rules:
        outcomes[rule] = _run(rule, model, tmp_path / rule)

    problems = []
    for rule, outcome in outcomes.items():
        if outcome.crash:
            problems.append(f"{rule}: crashed with {outcome.crash}")
        elif outcome.refusal is not None:
            if not outcome.refusal.strip() or "\n" in outcome.refusal:
                problems.append(f"{rule}: refusal is not one line: {outcome.refusal!r}")
        else:
            s = outcome.summary
            if s.get("status") != "ok" or not math.isfinite(s["train_loss"]) or not math.isfinite(s["test_loss"]):
                problems.append(f"{rule}: status {s.get('status')}, train_loss {s['train_loss']}, "
                                f"test_loss {s['test_loss']}")
    assert not problems, "\n".join(problems)

    for rule in EVERYWHERE:
        assert _trained(outcomes[rule]), f"{rule} on {kind}: {outcomes[rule].refusal}"
    for rule, spec in registry.rules.items():  # rules for named models only (the TP family: mlp) refuse
        if spec.models is not None:
            assert outcomes[rule].refusal is not None and \
                f"rule '{rule}' does not support model '{model}'" in outcomes[rule].refusal, rule
    named_models_only = [rule for rule, spec in registry.rules.items() if spec.models is not None]
    assert {"target_prop", "dtp", "ddtp", "dfc"} <= set(named_models_only)

    # same start, different credit: feedback alignment ends with weights that are not backprop's (the two
    # losses can agree to 1e-5 by chance, so compare the weights the updates moved)
    fa_params, bp_params = outcomes["feedback_alignment"].trainer.params, outcomes["backprop"].trainer.params
    gap = max(float((fa_params[g][k] - bp_params[g][k]).abs().max()) for g in bp_params for k in bp_params[g])
    assert gap > 1e-4, f"feedback alignment trained {kind} exactly as backprop did (largest weight gap {gap})"

    if kind == "resnet18":
        for rule in BLOCK_LEVEL:
            assert _trained(outcomes[rule]), f"{rule} on {kind}: {outcomes[rule].refusal}"
        assert len(outcomes["direct_feedback_alignment"].summary["alignment_angle_deg"]) == \
            outcomes["direct_feedback_alignment"].trainer.network.num_blocks
    if kind == "resnet18":
        assert outcomes["direct_feedback_alignment"].trainer.network.num_blocks == 7
    if kind == "functional":
        network = outcomes["feedback_alignment"].trainer.network
        assert network.num_blocks == 1
        # F.conv2d and F.linear on raw parameters are layers the feedback reaches
        assert feedback_weight_keys(network) == ["blocks.0.conv_weight", "blocks.0.out_weight"]
        for rule in BLOCK_LEVEL:
            refusal = outcomes[rule].refusal
            assert refusal is not None and refusal.startswith(f"rule '{rule}' needs"), rule
            assert network.split_note in refusal and "0 top-level children with parameters" in refusal
    if kind == "sequential":
        trainer = outcomes["backprop"].trainer
        norm = trainer.network.blocks[1]
        assert [name for name, _ in trainer.network.tracked_norms] == ["blocks.1"]
        # one training step moves the running statistics once (the alignment measurement does not)
        assert int(norm.num_batches_tracked) == 1
        assert norm.running_mean.abs().max() > 1e-4 and (norm.running_var - 1).abs().max() > 1e-4
        # the user's own instance is untouched: each run trained a copy of it
        assert SEQUENTIAL[1].track_running_stats and int(SEQUENTIAL[1].num_batches_tracked) == 0
        assert torch.equal(SEQUENTIAL[1].running_mean, torch.zeros(6))


@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_block_level_rules_on_parameter_free_blocks_train(rule, tiny_digits, tmp_path):
    config = TrainConfig(rule=rule, dataset="digits", model=model_name(SEQUENTIAL), epochs=1, batch_size=BATCH,
                         device="cpu")
    trainer = new_trainer(config, tmp_path / rule, progress=False)
    trainer.on_finish.clear()
    summary = trainer.run()
    assert summary["status"] == "ok" and math.isfinite(summary["train_loss"])


def test_a_module_class_handed_to_train_is_registered_and_trained(tiny_digits, tmp_path):
    out = tmp_path / "run"
    summary = fa_rules.train(rule="feedback_alignment", dataset="digits", model=FunctionalNet, epochs=1,
                             batch_size=BATCH, out_dir=out, progress=False)
    assert summary["status"] == "ok" and math.isfinite(summary["train_loss"])
    assert summary["model"] == "python:FunctionalNet"
    assert json.loads((out / "config.json").read_text())["model"] == "python:FunctionalNet"
    assert summary["params"] == 6 * 9 + 6 + 10 * 96 + 10


# -- through the command line --------------------------------------------------------------------------
def test_cli_trains_dfa_on_torchvision_resnet18(tiny_digits, tmp_path):
    out = tmp_path / "dfa"
    result = CliRunner().invoke(app, ["train", "--rule", "dfa", "--model", "torchvision:resnet18",
                                      "--dataset", "digits", "--epochs", "1", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["rule"] == "direct_feedback_alignment"
    assert summary["model"] == "torchvision:resnet18" and math.isfinite(summary["train_loss"])
    assert len(summary["alignment_angle_deg"]) == 7  # one per block: conv1 | bn1 | layer1..4 | fc


# Mistakes go through the entry point (`main`): it is what turns them into one line and exit code 2.
@pytest.mark.parametrize("rule, model, expected", [
    ("bidirectional_fa", "torchvision:resnet18", "error: rule 'bidirectional_fa' needs one layer per block"),
    ("dfa", "torchvision:resnt18", "error: unknown torchvision model 'resnt18' (did you mean: resnet18"),
], ids=["rule-needs-layered-blocks", "misspelt-torchvision-name"])
def test_cli_refuses_in_one_line(rule, model, expected, tiny_digits, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stderr = run_main(["train", "--rule", rule, "--model", model, "--dataset", "digits", "--epochs", "1",
                             "--out", str(out), "-q"], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), stderr
    assert not out.exists()  # refused before the run directory is made


def test_torchvision_resnet18_registered_by_a_plugin_trains_as_it_is(tiny_digits, tmp_path):
    """The issue's first case: `torchvision.models.resnet18(num_classes=10)` returned by a plugin's factory."""
    summary = fa_rules.train(rule="direct_feedback_alignment", dataset="digits", model="plugin_resnet18", epochs=1,
                             batch_size=BATCH, out_dir=tmp_path / "run", progress=False)
    assert summary["status"] == "ok" and math.isfinite(summary["train_loss"])
    assert len(summary["alignment_angle_deg"]) == 7  # conv1 | bn1 | layer1 | layer2 | layer3 | layer4 | fc
