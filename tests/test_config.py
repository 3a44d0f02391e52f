"""`check_config`: the one place that says which values a run accepts (CLI, config.json, suites)."""

import dataclasses
import json
import math

import pytest

from fa_rules.core.config import MAX_SEED, TrainConfig, check_config, read_config
from fa_rules.core.errors import UserError

BAD = [
    ("lr", -1.0, "--lr must be a number in (0, 1e+30], got -1"),
    ("lr", math.nan, "--lr must be a number in (0, 1e+30], got nan"),
    ("lr", math.inf, "--lr must be a number in (0, 1e+30], got inf"),
    ("lr", "0.1", "--lr must be a number in (0, 1e+30], got '0.1'"),
    ("lr", True, "--lr must be a number in (0, 1e+30], got True"),
    ("lr", 10**400, "--lr must be a number in (0, 1e+30], got an integer of 401 digits"),  # too big for a float
    ("group_lr", {"model": 0.0}, "--group-lr model must be a number in (0, 1e+30], got 0"),
    ("group_lr", [1], "--group-lr must map names to values"),
    ("momentum", 1.0, "--momentum must be a number in [0, 1), got 1"),
    ("weight_decay", -1e-4, "--weight-decay must be a number in [0, 1e+12]"),
    ("latent_dim", 0, "--latent-dim must be an integer in 1..16384, got 0"),
    ("epochs", -1, "--epochs must be an integer in 0..1000000, got -1"),
    ("epochs", 2.0, "--epochs must be an integer in 0..1000000, got 2"),
    ("batch_size", 0, "--batch-size must be an integer in 1..1048576"),
    ("batch_size", True, "--batch-size must be an integer in 1..1048576, got True"),  # bool is not an int
    ("eval_batch_size", 0, "eval_batch_size must be an integer in 1..1048576, got 0"),
    ("seed", 2**70, f"--seed must be an integer in 0..{MAX_SEED}"),
    ("seed", -1, "--seed must be an integer in 0.."),
    ("optimizer", "adagrad", "--optimizer must be adam or sgd, got 'adagrad'"),
    ("lr_schedule", "linear", "--lr-schedule must be constant or cosine or step, got 'linear'"),
    ("device", "tpu", "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("device", None, "--device must be auto, cpu, cuda or cuda:N"),
    ("data_dir", 3, "--data-dir must be a path or nothing, got 3"),
    ("model_options", {1: 2}, "--model-opt must map names to values"),
    ("divergence_factor", -1.0, "--divergence-factor must be a number in [0, 1e+12] (0: off), got -1"),
    ("rule", "", "--rule must be a name"),
    ("compile", "yes", "--compile must be true or false, got 'yes'"),
    ("compile", 1, "--compile must be true or false, got 1"),
]


@pytest.mark.parametrize("name, value, message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_field_is_one_line_naming_the_flag(name, value, message):
    with pytest.raises(UserError) as e:
        check_config(dataclasses.replace(TrainConfig(), **{name: value}))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_fields_are_named_as_written_when_not_from_the_command_line():
    with pytest.raises(UserError, match=r"^suite.toml cell backprop seed 0: group_lr.model must be a number in"):
        check_config(TrainConfig(group_lr={"model": -1}), "suite.toml cell backprop seed 0")


OPTIONS = [  # checked against the registered rule and model, spelled as where they were written
    ("rule_options", {"beta": [1, 2]}, None,
     "rule 'dtp': option 'beta' must be a number in (0, 1e+06], got [1, 2]; e.g. --opt beta=0.5"),
    ("rule_options", {"beta": math.nan}, "f.json", "f.json: rule 'dtp': option 'beta' must be a number in "
                                                   '(0, 1e+06], got nan; e.g. "rule_options": {"beta": 0.5}'),
    ("model_options", {"width": {"a": 1}}, None, "model 'mlp': option 'width' must be an integer, got {'a': 1}; "
                                                 "e.g. --width 256"),
    ("model_options", {"activation": 3}, "f.json", "f.json: model 'mlp': option 'activation' must be a string, got 3"),
    ("rule_options", {"nosuch": 1}, None, "rule 'dtp' has no option nosuch (options: "),
]


@pytest.mark.parametrize("name, value, where, message", OPTIONS, ids=[f"{n}={v!r}" for n, v, _, _ in OPTIONS])
def test_options_are_checked_against_the_registered_rule_and_model(name, value, where, message):
    from fa_rules.plugins.manager import get_registry

    config = TrainConfig(rule="dtp", **{name: value})
    check_config(config, where)  # without the registry, options are left to the rule's build
    with pytest.raises(UserError) as e:
        check_config(config, where, registry=get_registry())
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_defaults_and_edges_are_accepted():
    check_config(TrainConfig())
    check_config(TrainConfig(seed=MAX_SEED, epochs=0, momentum=0.0, weight_decay=0, lr=1, divergence_factor=0,
                             device="cuda:3", data_dir="/data", compile=True, rule_options={"a": True, "b": "x", "c": 2}))
    from fa_rules.plugins.manager import get_registry

    check_config(TrainConfig(rule="dfa", rule_options={"feedback_seed": MAX_SEED, "scale": 0, "projection": "conv"},
                             model_options={"width": 1}), registry=get_registry())


def test_from_dict_checks_what_it_builds_and_ignores_unknown_keys():
    assert TrainConfig.from_dict({"lr": 0.1, "from_a_newer_version": 1}).lr == 0.1
    with pytest.raises(UserError, match=r"^f.json: lr must be a number in \(0, 1e\+30\], got nan$"):
        TrainConfig.from_dict(json.loads('{"lr": NaN}'), "f.json")
    with pytest.raises(UserError, match=r"^f.json: expected a table of settings, got list$"):
        TrainConfig.from_dict([], "f.json")


def test_read_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UserError, match=r"config.json is not a readable JSON run configuration"):
        read_config(path)
    path.write_text(json.dumps({**TrainConfig().to_dict(), "seed": 2**70}))
    with pytest.raises(UserError, match=r"config.json: seed must be an integer in 0\.\."):
        read_config(path)
    path.write_text(json.dumps(TrainConfig(lr=0.5).to_dict()))
    assert read_config(path) == TrainConfig(lr=0.5)
