"""Cells: one (rule, seed, varied settings) combination of a suite, with its TrainConfig."""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass

from fa_rules.core.config import TrainConfig
from fa_rules.benchmark.suite import _SETTING_FIELDS, RuleEntry, Suite

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
    """Every (varied settings, seed, rule) combination; the reference rule first in each group."""
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
                cells.append(Cell(entry, seed, point, config))
    return cells
