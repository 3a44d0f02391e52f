"""Cells: one (rule, seed, varied settings) combination of a suite, with its TrainConfig."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

from fa_rules.core.config import TrainConfig, check_config
from fa_rules.core.data import check_dataset
from fa_rules.core.errors import UserError
from fa_rules.benchmark.suite import _SETTING_FIELDS, RuleEntry, Suite, check_size
from fa_rules.plugins.manager import get_registry

@dataclass
class Cell:
    entry: RuleEntry
    seed: int
    point: dict  # the varied settings of this cell
    config: TrainConfig

    @property
    def dirname(self) -> str:
        parts = [self.entry.label] + [f"{k}{_slug(v)}" for k, v in self.point.items()] + [f"seed{self.seed}"]
        return "-".join(parts)


def _slug(v) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]", "_", str(v))


def plan_cells(suite: Suite) -> list[Cell]:
    """Every (varied settings, seed, rule) combination; the reference rule first in each group.

    Refuses (one UserError line) a suite with too many cells before listing any, and a cell whose
    settings are wrong (types, ranges, rule and model options) before any cell trains."""
    check_size(suite)
    registry = get_registry()
    rules = sorted(suite.rules, key=lambda e: e.label != suite.reference)
    keys = list(suite.vary)
    cells = []
    for values in itertools.product(*(suite.vary[k] for k in keys)):
        point = dict(zip(keys, values))
        for seed in suite.seeds:
            for entry in rules:
                settings = copy.deepcopy(suite.settings)
                model_options = settings.pop("model_options", {})
                config = TrainConfig(rule=entry.name, rule_options=dict(entry.options), seed=seed,
                                     model_options=dict(model_options), **settings)
                for k, v in entry.overrides.items():
                    if k == "model_options":
                        config.model_options.update(v)
                    elif k == "group_lr":
                        config.group_lr = {**config.group_lr, **v}
                    else:
                        setattr(config, k, v)
                for k, v in point.items():
                    if k in _SETTING_FIELDS:
                        setattr(config, k, v)
                    else:
                        config.model_options[k] = v
                where = "".join(f" {k}={v}" for k, v in point.items())
                check_config(config, f"{suite.source or 'suite'}: rule '{entry.label}' seed {seed}{where}", "toml",
                             registry)
                cells.append(Cell(entry, seed, point, config))
    return cells


def _distinct(cells: list[Cell], *fields: str) -> list[Cell]:
    """The first cell of each combination of these config fields (what one check reads)."""
    first: dict[str, Cell] = {}
    for cell in cells:
        first.setdefault(repr([getattr(cell.config, f) for f in fields]), cell)
    return list(first.values())


def _in_cell(where: str, cell: Cell, e: UserError) -> UserError:
    label = f"rule '{cell.entry.label}': " if f"'{cell.entry.label}'" not in str(e) else ""
    return UserError(f"{where}: {label}{e}")


def check_cell_settings(cells: list[Cell], where: str = "suite") -> None:
    """Resolve every cell's rule, dataset and model names against the plugin registry and build
    each rule with its options (which also checks the settings that depend on each other): cheap
    checks that read no data and need no particular machine."""
    registry = get_registry()
    for cell in _distinct(cells, "rule", "rule_options", "dataset", "model"):
        c = cell.config
        try:
            spec = registry.rule(c.rule)
            registry.dataset(c.dataset)
            registry.model(c.model)
            spec.check_model(c.model)
            try:
                spec.make(**c.rule_options)  # unknown options and values the rule refuses
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"rule '{spec.name}' refuses options {c.rule_options}: "
                                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
        except UserError as e:
            raise _in_cell(where, cell, e) from None


def check_cells(cells: list[Cell], where: str = "suite") -> None:
    """Everything a cell could fail on before it trains, checked for every cell at once: names and
    options (`check_cell_settings`), each device on this machine, each dataset loaded once, each
    cell's model built, and the parameter groups that `group_lr` names trained by the rule. A
    misspelt name, data not in place or a model its settings cannot build is one line before any
    cell trains, not a failed row after hours."""
    from fa_rules.core.trainer import resolve_device
    from fa_rules.runs import resolve

    registry = get_registry()
    check_cell_settings(cells, where)
    for cell in _distinct(cells, "device"):
        try:
            resolve_device(cell.config.device)  # e.g. --device cuda on a machine without CUDA
        except UserError as e:
            raise UserError(f"{where}: {e}; device auto uses CUDA where it is present, else the CPU") from None
    datasets = {}
    for c in (cell.config for cell in _distinct(cells, "dataset", "data_dir")):
        try:
            datasets[c.dataset, c.data_dir] = dataset = registry.dataset(c.dataset).load(c.data_dir)
            check_dataset(dataset)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    for cell in _distinct(cells, "rule", "rule_options", "dataset", "data_dir", "model", "model_options",
                          "latent_dim", "group_lr"):
        try:
            rule, _, build_network = resolve(copy.deepcopy(cell.config), registry,
                                             dataset=datasets[cell.config.dataset, cell.config.data_dir])
            if cell.config.group_lr:
                _check_groups(cell.config, rule, build_network)
        except UserError as e:
            raise _in_cell(where, cell, e) from None


def _check_groups(config: TrainConfig, rule, build_network) -> None:
    """The groups `group_lr` names are groups the rule trains (known once the rule has set up its
    parameters on the cell's network)."""
    import difflib

    import torch

    network = build_network()
    try:
        params, _ = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    except UserError:
        raise
    except Exception:  # a rule whose set-up fails fails its own cells, as it would without group_lr
        return
    for group in sorted(set(config.group_lr) - set(params)):
        close = difflib.get_close_matches(group, list(params), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"group_lr names group '{group}', which rule '{config.rule}' does not train "
                        f"({hint}its groups: {', '.join(sorted(params))})")
