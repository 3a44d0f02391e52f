import json
import sys
import types
from importlib import metadata

import pytest
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import RuleSpec, UserError, hookimpl
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
    # the example package is pip-installed by CI; its entry point must be found through metadata
    registry = manager.build_registry()
    assert "readout_only" in registry.rules
    assert registry.source("rules", "readout_only").distribution == "fa-rules-readout"


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


def test_duplicate_name_is_an_error_naming_both_plugins(monkeypatch):
    monkeypatch.setitem(sys.modules, "dup_plugin", _module("dup_plugin", "backprop"))
    _fake_entry_points(monkeypatch, {"dup": "dup_plugin"})
    with pytest.raises(UserError, match=r"'fa_rules.rules.backprop'.*'dup'"):
        manager.build_registry()


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
