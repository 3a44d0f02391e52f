"""From names in a configuration to a ready Trainer: the one place that resolves plugins."""

from __future__ import annotations

import datetime
from pathlib import Path

from fa_rules.core.errors import UserError
from fa_rules.core.trainer import (
    CHECKPOINT_FILE,
    TrainConfig,
    Trainer,
    prepare_run_dir,
    read_run_config,
)
from fa_rules.plugins.manager import Registry, get_registry


def default_out_dir(config: TrainConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{config.rule}-{config.dataset}-{config.model}-{stamp}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def resolve(config: TrainConfig, registry: Registry | None = None):
    """Check the configuration against the registry; return (rule, dataset, build_network)."""
    registry = registry or get_registry()
    rule_spec = registry.rule(config.rule)
    config.rule = rule_spec.name  # aliases resolve to the canonical name in the saved config
    dataset_spec = registry.dataset(config.dataset)
    model_spec = registry.model(config.model)
    if rule_spec.models is not None and config.model not in rule_spec.models:
        raise UserError(
            f"rule '{rule_spec.name}' does not support model '{config.model}' "
            f"(supported: {', '.join(rule_spec.models)})"
        )
    rule = rule_spec.make(**config.rule_options)
    model_options = {
        k: v for k, v in rule_spec.model_defaults.items() if k in model_spec.options and k not in config.model_options
    }
    model_options.update(config.model_options)
    config.model_options = model_options
    dataset = dataset_spec.load(config.data_dir)
    if rule.task == "classify":
        out_shape = (dataset.num_classes,)
    else:
        out_shape = (config.latent_dim,)
    heads = rule.heads(config.latent_dim, dataset.num_classes) if rule.heads else None
    model_spec.make(dataset.in_shape, out_shape, heads, **model_options)  # fail early on bad options

    def build_network():
        return model_spec.make(dataset.in_shape, out_shape, heads, **model_options)

    return rule, dataset, build_network


def new_trainer(config: TrainConfig, out_dir: Path | None = None, progress: bool = True) -> Trainer:
    """A trainer for a fresh run; the run directory must not hold an earlier run."""
    rule, dataset, build_network = resolve(config)
    out_dir = Path(out_dir) if out_dir else default_out_dir(config)
    trainer = Trainer(config, rule, build_network, dataset, out_dir, progress=progress)
    prepare_run_dir(out_dir, config)
    return trainer


def resume_trainer(run_dir: Path, epochs: int | None = None, progress: bool = True) -> Trainer:
    """A trainer continuing the run in `run_dir` (to `epochs` in total, if given)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    config = read_run_config(run_dir)
    if epochs is not None:
        config.epochs = epochs
    rule, dataset, build_network = resolve(config)
    trainer = Trainer(config, rule, build_network, dataset, run_dir, progress=progress)
    if (run_dir / CHECKPOINT_FILE).is_file():
        trainer.load(run_dir / CHECKPOINT_FILE)
    if trainer.epoch > config.epochs:
        raise UserError(f"{run_dir} has already trained {trainer.epoch} epochs; ask for --epochs >= {trainer.epoch}")
    from fa_rules.core.checkpoint import write_json

    write_json(run_dir / "config.json", config.to_dict())
    return trainer
