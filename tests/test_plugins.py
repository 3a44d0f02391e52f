import json
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import RuleSpec, hookimpl
from fa_rules.plugins import manager
from fa_rules.rules.backprop import backprop


def _fake_entry_points(monkeypatch, modules: dict[str, str]):
    eps = [metadata.EntryPoint(name=n, value=v, group=manager.ENTRY_POINT_GROUP) for n, v in modules.items()]
    real = metadata.entry_points

    def entry_points(group=None, **kw):
        return eps if group == manager.ENTRY_POINT_GROUP else real(group=group, **kw)

    monkeypatch.setattr(manager.metadata, "entry_points", entry_points)


def _module(name: str, rule_name: str):
    mod = types.ModuleType(name)

    @hookimpl
    def register_rules(register):
        register(RuleSpec(rule_name, backprop, "test rule"))

    mod.register_rules = register_rules
    return mod


def test_builtins_registered_with_their_distribution():
    registry = manager.build_registry(autoload=False)
    assert "backprop" in registry.rules and "digits" in registry.datasets and "mlp" in registry.models
    assert registry.source("rules", "backprop").distribution == "fa-rules"


def test_third_party_entry_point_is_discovered_for_real():
    # conftest.py gives examples/readout-plugin a temporary *.dist-info (as `pip install` would);
    # its entry point must be found through metadata
    registry = manager.build_registry()
    assert "readout_only" in registry.rules
    assert registry.source("rules", "readout_only").distribution == "fa-rules-readout"
    # the repository's source, even where an older copy is pip-installed
    examples = Path(__file__).resolve().parents[1] / "examples"
    assert Path(sys.modules["fa_rules_readout"].__file__).is_relative_to(examples / "readout-plugin")


def test_cli_subprocesses_find_the_example_plugins_too():
    # the CLI and torchrun processes tests start get the example plugins through PYTHONPATH
    result = subprocess.run([sys.executable, "-m", "fa_rules", "models", "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["my_resnet"]["distribution"] == "fa-rules-resnet"


def test_no_autoload_env_var_turns_entry_points_off(monkeypatch):
    monkeypatch.setenv(manager.NO_AUTOLOAD_ENV, "1")
    registry = manager.build_registry()
    assert "readout_only" not in registry.rules and "backprop" in registry.rules


def test_broken_plugin_is_reported_and_others_keep_working(monkeypatch):
    monkeypatch.setitem(sys.modules, "good_plugin", _module("good_plugin", "good_rule"))
    _fake_entry_points(monkeypatch, {"broken": "no_such_module_xyz", "good": "good_plugin"})
    registry = manager.build_registry()
    assert "good_rule" in registry.rules
    assert registry.failures and registry.failures[0][0] == "broken"
    assert "ModuleNotFoundError" in registry.failures[0][1]


def _alias_module(name: str, rule_name: str, alias: str):
    mod = types.ModuleType(name)

    @hookimpl
    def register_rules(register):
        register(RuleSpec(rule_name, backprop, "test rule", aliases=(alias,)))

    mod.register_rules = register_rules
    return mod


@pytest.mark.parametrize("taken", ["name", "alias"])
def test_a_taken_name_is_a_warning_naming_both_distributions_and_the_first_stays(monkeypatch, taken):
    if taken == "name":  # a plugin registering 'backprop' again
        monkeypatch.setitem(sys.modules, "dup_plugin", _module("dup_plugin", "backprop"))
    else:  # a new rule whose alias 'dfa' is a built-in's
        monkeypatch.setitem(sys.modules, "dup_plugin", _alias_module("dup_plugin", "my_dfa", "dfa"))
    monkeypatch.setitem(sys.modules, "good_plugin", _module("good_plugin", "good_rule"))
    _fake_entry_points(monkeypatch, {"dup": "dup_plugin", "good": "good_plugin"})
    registry = manager.build_registry()
    [conflict] = registry.conflicts
    name = "backprop" if taken == "name" else "dfa"
    assert f"'{name}'" in conflict and "'dup'" in conflict and "fa-rules" in conflict
    assert "unknown" in conflict  # the plugin's distribution (a fake entry point has none)
    # the built-in keeps the name; everything else works
    assert registry.source("rules", name).distribution == "fa-rules"
    assert registry.rule(name) is registry.rules[registry.aliases.get(name, name)]
    assert registry.rule("backprop").build is backprop and "my_dfa" not in registry.rules
    assert "good_rule" in registry.rules and "readout_only" not in registry.rules


def test_a_taken_name_leaves_the_rules_command_working(monkeypatch):
    monkeypatch.setitem(sys.modules, "dup_plugin", _alias_module("dup_plugin", "my_dfa", "dfa"))
    _fake_entry_points(monkeypatch, {"dup": "dup_plugin"})
    monkeypatch.setattr(manager, "_cached", None)  # built with the plugin now; restored afterwards
    result = CliRunner().invoke(app, ["rules"])
    assert result.exit_code == 0, result.output
    assert "direct_feedback_alignment (dfa)" in result.stdout
    assert "warning: rule name 'dfa' of plugin 'dup'" in result.stderr


def test_rules_command_json_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["rules", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["backprop"]["task"] == "classify" and rows["backprop"]["distribution"] == "fa-rules"
    assert rows["readout_only"]["distribution"] == "fa-rules-readout"
    table = runner.invoke(app, ["rules"])
    assert table.exit_code == 0 and "backprop" in table.stdout
    for command in ("datasets", "models"):
        assert runner.invoke(app, [command, "--json"]).exit_code == 0
