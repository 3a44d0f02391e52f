"""Every setting has a declared range, checked in one place before any step: a rule option out of its
range (`--opt`, a config.json, a suite), a training setting out of its range and a benchmark cell that
could never run are one line on stderr, exit code 2, nothing written; each message names the option,
what it must be and what to type instead, with flags that exist."""

import json
import math
import re
import sys

import pytest
import torch

from fa_rules.core.config import TrainConfig, check_config
from fa_rules.core.errors import UserError
from fa_rules.plugins.manager import get_registry

TINY = ["--width", "16", "--depth", "1", "--batch-size", "256", "-q"]
BIG = str(10**20)  # above 2**63: the int a generator cannot take


def run_cli(args, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `fa-rules ARGS` run in `cwd` through the entry point, in this process."""
    from fa_rules.cli.app import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fa-rules", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def command_flags(name: str) -> set[str]:
    import typer

    from fa_rules.cli.app import app

    return {opt for p in typer.main.get_command(app).commands[name].params for opt in p.opts}


def assert_one_line(code, stderr, fragments, command="train"):
    assert code == 2 and "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "true/false" not in lines[0]  # the option's own type and range, not every type there is
    unknown = {flag for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", lines[0])} - command_flags(command)
    assert not unknown, f"{lines[0]} names flags {unknown} that `fa-rules {command}` does not have"
    return lines[0]


# 1. rule options on the command line -----------------------------------------------------------------

SEEDED = ["feedback_alignment", "dfa", "ifa", "frsf", "drtp", "kolen_pollack", "bfa", "bdfa", "weight_mirror"]
SEED_RANGE = "option 'feedback_seed' must be an integer in -1..9223372036854775807"
# (rule, --opt, fragments): before, a traceback (overflow), a non-finite update, an allocation, a
# step that never ends, or silently accepted
OPTIONS = [
    *[(rule, f"feedback_seed={BIG}", [SEED_RANGE, "e.g. --opt feedback_seed=-1"]) for rule in SEEDED],
    ("dfa", "feedback_seed=1e20", [SEED_RANGE, "got '1e20'"]),
    ("kolen_pollack", "decay=1e308", ["rule 'kolen_pollack': option 'decay' must be a number in [0, 1e+06]",
                                      "got 1e+308", "e.g. --opt decay=0.001"]),
    ("kolen_pollack", "decay=-1", ["option 'decay' must be a number in [0, 1e+06], got -1"]),
    ("ddtp", "feedback_noise=1e308", ["rule 'ddtp': option 'feedback_noise' must be a number in (0, 1e+06]"]),
    ("ddtp", "feedback_noise=0", ["option 'feedback_noise' must be a number in (0, 1e+06], got 0"]),
    ("weight_mirror", "mirror_batch=1e20", ["option 'mirror_batch' must be an integer in 0..1048576 (0: the "
                                            "training batch size), got '1e20'"]),
    ("weight_mirror", f"mirror_batch={BIG}", ["option 'mirror_batch' must be an integer in 0..1048576"]),
    ("weight_mirror", "noise_std=0", ["option 'noise_std' must be a number in (0, 1e+06], got 0"]),
    ("vfa", "tau=nan", ["rule 'vfa': option 'tau' must be a number in (0, 1e+06], got nan", "e.g. --opt tau=1"]),
    ("vfa", "init=gaussian", ["option 'init' must be one of zeros, uniform, normal, got 'gaussian'"]),
    ("vfa", "beta=-1", ["option 'beta' must be a number in [0, 1e+06], got -1"]),
    ("vae", "beta=-1", ["rule 'vae': option 'beta' must be a number in [0, 1e+06], got -1"]),
    ("dfa", "projection=sparse", ["option 'projection' must be one of dense, conv, got 'sparse'"]),
    ("dfa", "scale=wide", ["option 'scale' must be a number in [0, 1e+06], got 'wide'"]),
    ("vfa", "orthogonal=maybe", ["option 'orthogonal' must be true or false, got 'maybe'", "--opt orthogonal=true"]),
    ("vfa", "stepz=3", ["rule 'vfa' has no option stepz (did you mean steps?"]),
]
# iteration counts inside one step: each has a generous but finite bound
ITERATION_COUNTS = [
    ("dfc", "steps", 1), ("dfc", "feedback_steps", 1), ("feature_alignment", "steps", 1), ("local_fa", "steps", 1),
    ("vfa", "steps", 1), ("vfa_gan", "steps", 1), ("ddtp", "feedback_iters", 0), ("dtp", "feedback_iters", 0),
    ("target_prop", "feedback_iters", 0), ("l_drl", "feedback_iters", 0), ("iterative_dtp", "input_iters", 0),
    ("iterative_dtp", "output_iters", 0), ("gan", "recon_steps", 0),
]
OPTIONS += [(rule, f"{key}=1000000000", [f"option '{key}' must be an integer in {low}..10000, got 1000000000"])
            for rule, key, low in ITERATION_COUNTS]


@pytest.mark.parametrize("rule, option, fragments", OPTIONS, ids=[f"{r}-{o}" for r, o, _ in OPTIONS])
def test_a_rule_option_out_of_its_range_is_one_line_before_any_run(rule, option, fragments, tmp_path, monkeypatch,
                                                                   capsys):
    # --epochs 0: a value the old code accepted ends at once (exit 0 and a run directory), not never
    code, stderr = run_cli(["train", "--rule", rule, "--opt", option, "--epochs", "0", *TINY, "--out", "run"],
                           tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, fragments)
    assert list(tmp_path.iterdir()) == []


def test_every_option_of_every_built_in_rule_has_a_declared_range_and_its_default_is_in_it():
    from fa_rules.core.config import value_problem

    for name, spec in get_registry().rules.items():
        if spec.build.__module__.startswith("fa_rules."):
            for key, default in spec.options.items():
                # parameter-name patterns (checked against the model); LR:NOISE:ITERS triples (each checked
                # against its range by the rule's parser)
                free_text = key in ("exact_gradient", "feedback_per_decoder")
                assert isinstance(default, bool) or free_text or key in spec.ranges, f"{name}: {key} has no declared range"
                assert value_problem(default, default, spec.ranges.get(key)) is None, (name, key)


def test_a_declared_range_must_name_an_option():
    from fa_rules.core import RuleSpec
    from fa_rules.rules.backprop import backprop

    with pytest.raises(ValueError, match="declares ranges for steps, which are not its options"):
        RuleSpec("r", backprop, "x", options={}, ranges={"steps": (1, 2)})


def test_a_rule_setting_is_never_named_as_the_rule():
    registry = get_registry()
    for name in ("vfa", "vfa_gan"):
        rule = registry.rule(name).make(conditional=True)
        with pytest.raises(UserError, match=rf"^{name} with conditional=true needs a labelled dataset$"):
            rule.heads(8, 0)
    from fa_rules.runs import resolve

    config = TrainConfig(rule="vfa_gan", latent_dim=4, model_options={"width": 16, "depth": 1})
    rule, _, build_network = resolve(config)
    network = build_network()
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"^rule 'vfa_gan' was trained without conditional=true"):
        rule.sample(network, params, state, 2, torch.Generator(), labels=torch.tensor([1, 2]))


# 2. model options and training settings on the command line -----------------------------------------

SETTINGS = [
    # a model option of a flag that does not exist (--width_multiplier) and of every type
    (["--rule", "vfa", "--model", "paper_encoder", "--model-opt", "width_multiplier=inf"],
     ["model 'paper_encoder': option 'width_multiplier' must be a finite number, got inf",
      "e.g. --model-opt width_multiplier=1"]),
    (["--rule", "vfa", "--model", "paper_encoder", "--model-opt", "width_multiplier=wide"],
     ["option 'width_multiplier' must be a finite number, got 'wide'"]),
    # the latent size is the latent size's fault, not the width's
    (["--rule", "ae", "--latent-dim", "3000000000", "--width", "2"],
     ["--latent-dim must be an integer in 1..16384, got 3000000000"]),
    (["--batch-size", "1000000000000"], ["--batch-size must be an integer in 1..1048576"]),
    (["--lr", "1e300"], ["--lr must be a number in (0, 1e+30], got 1e+300"]),
    (["--weight-decay", "1e300"], ["--weight-decay must be a number in [0, 1e+12], got 1e+300"]),
    (["--divergence-factor", "1e300"], ["--divergence-factor must be a number in [0, 1e+12] (0: off)"]),
    (["--rule", "kolen_pollack", "--group-lr", "feedback=1e300"],
     ["--group-lr feedback must be a number in (0, 1e+30], got 1e+300"]),
]


@pytest.mark.parametrize("args, fragments", SETTINGS, ids=[" ".join(a[-2:]) for a, _ in SETTINGS])
def test_a_setting_out_of_its_range_is_one_line_naming_a_flag_that_exists(args, fragments, tmp_path, monkeypatch,
                                                                         capsys):
    code, stderr = run_cli(["train", "--epochs", "0", "-q", *args, "--out", "run"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 10**12, "--epochs must be an integer in 0..1000000, got 1000000000000"),
    ("eval_every", 10**7, "--eval-every must be an integer in 1..1000000"),
    ("eval_batch_size", 2**30, "eval_batch_size must be an integer in 1..1048576"),
    ("lr", 10**400, "--lr must be a number in (0, 1e+30], got an integer of 401 digits"),
    ("momentum", 10**400, "--momentum must be a number in [0, 1)"),
])
def test_every_numeric_training_setting_has_a_range(field, value, message):
    with pytest.raises(UserError) as info:
        check_config(TrainConfig(**{field: value}))
    assert str(info.value).startswith(message), str(info.value)


# 3. a config.json edited by hand, then --resume ----------------------------------------------------

CONFIG = dict(rule="dfa", epochs=1, batch_size=256, model_options={"width": 16, "depth": 1})
EDITS = [
    ("lr", 10**400, ["config.json: lr must be a number in (0, 1e+30], got an integer of 401 digits"]),
    ("lr", math.nan, ["config.json: lr must be a number in (0, 1e+30], got nan"]),
    ("batch_size", 10**12, ["config.json: batch_size must be an integer in 1..1048576"]),
    ("weight_decay", 1e300, ["config.json: weight_decay must be a number in [0, 1e+12]"]),
    ("divergence_factor", 1e300, ["config.json: divergence_factor must be a number in [0, 1e+12] (0: off)"]),
    ("rule_options", {"feedback_seed": 10**20},
     ["config.json: rule 'direct_feedback_alignment': " + SEED_RANGE, 'e.g. "rule_options": {"feedback_seed": -1}']),
    ("rule_options", {"feedback_seed": 1e20}, [SEED_RANGE, "got 1e+20"]),
    ("rule_options", {"scale": [1]}, ["config.json: rule 'direct_feedback_alignment': option 'scale' must be a "
                                      "number in [0, 1e+06], got [1]"]),
    ("model_options", {"width": "wide"}, ["config.json: model 'mlp': option 'width' must be an integer, got 'wide'",
                                          'e.g. "model_options": {"width": 256}']),
    ("model_options", {"widht": 3}, ["config.json: model 'mlp' has no option widht (did you mean width?"]),
]


@pytest.mark.parametrize("key, value, fragments", EDITS, ids=[f"{k}={v!r}"[:40] for k, v, _ in EDITS])
def test_a_hand_edited_config_json_is_one_line_naming_the_file_before_anything_is_written(key, value, fragments,
                                                                                        tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = {**TrainConfig(**CONFIG).to_dict(), key: value}
    text = json.dumps(data)  # NaN as Python's json module writes and reads it
    (run / "config.json").write_text(text)
    code, stderr = run_cli(["train", "--resume", run, "--epochs", "1", "-q"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, fragments)
    assert [p.name for p in run.iterdir()] == ["config.json"]  # no checkpoint, metrics or summary
    assert (run / "config.json").read_text() == text  # not rewritten


def test_a_config_json_nested_too_deeply_is_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"rule_options": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    code, stderr = run_cli(["train", "--resume", run, "-q"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, ["config.json is not a readable JSON run configuration (nested too deeply)"])
    assert [p.name for p in run.iterdir()] == ["config.json"]


# 4. benchmark suites: every cell's settings, group_lr, the device, and both forms of a [quick] table ----

SUITE_HEAD = 'rules = [{rule}]\n[settings]\nepochs = 1\nwidth = 16\ndepth = 1\nbatch_size = 256\n{settings}' \
             '[measure]\ntiming = false\nfid = false\n{rest}'
SUITES = [
    ('{ name = "dfa", options = { feedback_seed = 1e20 } }', "", "",
     ["rule 'dfa' seed 0: rule 'direct_feedback_alignment': " + SEED_RANGE, "got 1e+20",
      "e.g. options = { feedback_seed = -1 }"]),
    ('{ name = "ddtp", options = { feedback_noise = 1e308 } }', "", "",
     ["option 'feedback_noise' must be a number in (0, 1e+06], got 1e+308"]),
    ('{ name = "dfc", options = { steps = 1000000000 } }', "", "",
     ["rule 'dfc': option 'steps' must be an integer in 1..10000, got 1000000000", "e.g. options = { steps = 40 }"]),
    ('{ name = "backprop", model_options = { width = "wide" } }', "", "",
     ["model 'mlp': option 'width' must be an integer, got 'wide'", "e.g. width = 256"]),
    ('{ name = "kolen_pollack", group_lr = { feedbak = 0.1 } }', "", "",
     ["group_lr names group 'feedbak', which rule 'kolen_pollack' does not train (did you mean feedback? "
      "its groups: feedback, model)"]),
    ('"backprop"', "", "[quick]\nsettings = { lr = -1.0 }\n",
     ["bad.toml (with --quick): rule 'backprop' seed 0: lr must be a number in (0, 1e+30], got -1"]),
    ('"backprop"', "", '[quick]\nrules = [{ name = "dfa", options = { projection = "sparse" } }]\n',
     ["bad.toml (with --quick): rule 'dfa' seed 0: rule 'direct_feedback_alignment': option 'projection' must be "
      "one of dense, conv, got 'sparse'"]),
    ('"backprop"', "", "timing_steps = 1000000000\n",
     ["[measure] timing_steps must be an integer in 1..10000, got 1000000000; e.g. timing_steps = 20"]),
    ('"backprop"', "", "[anchors.test_error]\nbackprop = " + str(10**400) + "\n",
     ["[anchors.test_error] backprop must be a finite number, got an integer of 401 digits"]),
]


@pytest.mark.parametrize("rule, settings, rest, fragments", SUITES,
                         ids=[f"{r[:30]}{s}{t[:30]}" for r, s, t, _ in SUITES])
def test_a_suite_cell_that_could_never_run_is_one_line_before_any_cell_trains(rule, settings, rest, fragments,
                                                                             tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.toml").write_text(SUITE_HEAD.format(rule=rule, settings=settings, rest=rest))
    code, stderr = run_cli(["benchmark", "bad.toml", "--out", "out", "-q"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, ["bad.toml", *fragments], command="benchmark")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_the_full_form_of_a_suite_is_checked_under_quick_too(tmp_path, monkeypatch, capsys):
    text = SUITE_HEAD.format(rule='"backprop"', settings="lr = nan\n", rest="[quick]\nsettings = { lr = 0.01 }\n")
    (tmp_path / "bad.toml").write_text(text)
    code, stderr = run_cli(["benchmark", "bad.toml", "--quick", "--out", "out", "-q"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, ["bad.toml (without --quick): rule 'backprop' seed 0: lr must be a number in "
                                   "(0, 1e+30], got nan"], command="benchmark")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_benchmark_on_cuda_without_cuda_is_refused_before_any_cell(tmp_path, monkeypatch, capsys):
    code, stderr = run_cli(["benchmark", "--rules", "backprop", "--device", "cuda", "--epochs", "1", *TINY[:4],
                            "--out", "out", "-q"], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, ["device 'cuda' asked for, but CUDA is not available here",
                                   "device auto uses CUDA where it is present"], command="benchmark")
    assert list(tmp_path.iterdir()) == []
