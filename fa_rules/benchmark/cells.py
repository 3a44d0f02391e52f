"""Cells: one (rule, seed, varied settings) combination of a suite, with its TrainConfig."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

from fa_rules.core.config import TrainConfig, check_config, kind_mismatch
from fa_rules.core.data import check_dataset
from fa_rules.core.errors import UserError
from fa_rules.benchmark.suite import _SETTING_FIELDS, RuleEntry, Suite, check_size

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
    settings are wrong before any cell trains."""
    check_size(suite)
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
                check_config(config, f"{suite.source or 'suite'}: rule '{entry.label}' seed {seed}{where}")
                cells.append(Cell(entry, seed, point, config))
    return cells


def check_cells(cells: list[Cell], where: str = "suite") -> None:
    """Resolve every cell's rule, rule options, dataset, model and model options against the plugin
    registry, load each dataset once and build each cell's model: a misspelt name, data not in
    place or a model its settings cannot build is one line before any cell trains, not a failed
    row after hours."""
    from fa_rules.plugins.manager import get_registry
    from fa_rules.runs import resolve

    registry = get_registry()
    distinct: dict[str, Cell] = {}  # the first cell of each setting these checks read
    for cell in cells:
        c = cell.config
        distinct.setdefault(repr((c.rule, c.rule_options, c.dataset, c.data_dir, c.model, c.model_options,
                                  c.latent_dim)), cell)

    def in_cell(cell: Cell, e: UserError) -> UserError:
        label = f"rule '{cell.entry.label}': " if f"'{cell.entry.label}'" not in str(e) else ""
        return UserError(f"{where}: {label}{e}")

    # names and options first (cheap), then the data (a load, maybe a download), then the models
    for cell in distinct.values():
        c = cell.config
        try:
            spec = registry.rule(c.rule)
            registry.dataset(c.dataset)
            model = registry.model(c.model)
            if spec.models is not None and c.model not in spec.models:
                raise UserError(f"rule '{spec.name}' does not support model '{c.model}' "
                                f"(supported: {', '.join(spec.models)})")
            unknown = sorted(set(c.model_options) - set(model.options))
            if unknown:
                raise UserError(f"model '{c.model}' has no option {', '.join(unknown)} "
                                f"(options: {', '.join(sorted(model.options)) or 'none'})")
            for k, v in c.model_options.items():  # of the type of the model's default, as on the command line
                must_be = kind_mismatch(model.options[k], v)
                if must_be:
                    raise UserError(f"model '{c.model}' option {k} must be {must_be}, got {v!r}")
            try:
                spec.make(**c.rule_options)  # unknown options and values the rule refuses
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"rule '{spec.name}' refuses options {c.rule_options}: "
                                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
        except UserError as e:
            raise in_cell(cell, e) from None
    datasets = {}
    for c in (cell.config for cell in distinct.values()):
        if (c.dataset, c.data_dir) not in datasets:
            try:
                datasets[c.dataset, c.data_dir] = dataset = registry.dataset(c.dataset).load(c.data_dir)
                check_dataset(dataset)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
    for cell in distinct.values():
        try:
            resolve(copy.deepcopy(cell.config), registry, dataset=datasets[cell.config.dataset, cell.config.data_dir])
        except UserError as e:
            raise in_cell(cell, e) from None
