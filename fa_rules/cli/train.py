"""`fa-rules train`: train a model with a rule into a run directory (thin; the work is in fa_rules.runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from fa_rules.cli.common import Interrupted, out, parse_pairs, parse_value, registry
from fa_rules.core.errors import UserError


# what a resumed run may be given: the rest of its settings are those of its config.json
RESUME_OPTIONS = ("resume", "epochs", "quiet", "fid", "fid_weights")


def _typed_options(ctx: typer.Context) -> list[tuple[str, str]]:
    """(name, flag) of each option the user gave (on the command line or through the environment)."""
    given = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given.append((param.name, max(param.opts, key=len)))
    return given


def train(
    ctx: typer.Context,
    rule: str = typer.Option("backprop", "--rule", "-r", help="Credit-assignment rule (see `fa-rules rules`)."),
    dataset: str = typer.Option("digits", "--dataset", "-d", help="Dataset (see `fa-rules datasets`)."),
    model: str = typer.Option("mlp", "--model", "-m", help="Model family (see `fa-rules models`), or torchvision:NAME (e.g. torchvision:resnet18)."),
    depth: Optional[int] = typer.Option(None, help="mlp: number of hidden blocks."),
    width: Optional[int] = typer.Option(None, help="mlp: units per hidden block."),
    activation: Optional[str] = typer.Option(None, help="tanh, relu, leaky_relu or asinh."),
    model_opt: list[str] = typer.Option(
        [], "--model-opt", help="KEY=VALUE model setting, e.g. width_multiplier=0.25 or blocks=layer1,layer2,fc (repeatable; see `fa-rules models`)."
    ),
    latent_dim: int = typer.Option(32, help="Latent size for reconstruct / generate rules."),
    epochs: Optional[int] = typer.Option(None, help="Epochs in total (default 20; with --resume: continue to this)."),
    batch_size: int = typer.Option(64, help="Examples per training step."),
    lr: float = typer.Option(1e-3, help="Learning rate of every parameter group."),
    group_lr: list[str] = typer.Option([], "--group-lr", help="GROUP=LR for one parameter group (repeatable)."),
    optimizer: str = typer.Option("adam", help="adam or sgd."),
    momentum: float = typer.Option(0.9, help="sgd momentum."),
    weight_decay: float = typer.Option(0.0, help="Weight decay of the optimiser."),
    lr_schedule: str = typer.Option(
        "constant", help="constant; cosine: every group's rate decays to 0 over the run's --epochs; step: divided by 10 at half and three quarters of them."
    ),
    opt: list[str] = typer.Option([], "--opt", "-o", help="KEY=VALUE rule setting (repeatable; see `fa-rules rules`)."),
    seed: int = typer.Option(0, help="Seed for initialisation, rule randomness and data order."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    data_dir: Optional[str] = typer.Option(None, help="Where datasets live (else $FA_RULES_DATA_DIR or ~/.cache/fa-rules/data)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: a new one under runs/)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    fid: int = typer.Option(0, "--fid", help="Generative rules: FID of N samples vs N test images at the end (0: none)."),
    eval_every: int = typer.Option(
        1, help="Evaluate on the test set every N epochs and after the last (test metrics of the others are absent)."
    ),
    divergence_factor: float = typer.Option(
        1000.0, help="Stop as diverged when a step's training loss exceeds this factor times the run's first step's, "
        "or an epoch's mean this factor times the first epoch's (0: off)."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the rule's step (eager, with a warning, where it does not compile)."
    ),
    fid_weights: Optional[Path] = typer.Option(
        None, "--fid-weights", help="Inception weights for --fid (else $FA_RULES_FID_WEIGHTS or torch hub's cache)."
    ),
    validation_fraction: float = typer.Option(
        0.0, help="Hold out this fraction of the training split (stratified by label), train on the rest and "
        "evaluate on it instead of the test split, which is then never read; e.g. 0.1 (0: off)."
    ),
    validation_seed: int = typer.Option(0, help="Seed of the --validation-fraction split."),
):
    """Train a model with a credit-assignment rule; writes a run directory."""
    from fa_rules.core.config import TrainConfig, check_config
    from fa_rules.runs import add_fid, check_fid_request, new_trainer, resume_trainer

    plugins = registry()
    # every check passes before the run directory is made: FID's with the ready trainer
    check = (lambda trainer: check_fid_request(trainer, fid, fid_weights)) if fid else None
    if resume is not None:
        fixed = [flag for name, flag in _typed_options(ctx) if name not in RESUME_OPTIONS]
        if fixed:
            allowed = ", ".join("--" + n.replace("_", "-") for n in RESUME_OPTIONS[1:])
            raise UserError(f"--resume continues {resume} with the settings of its config.json: {', '.join(fixed)} "
                            f"cannot be given with it (only {allowed})")
        trainer = resume_trainer(resume, epochs, progress=not quiet, check=check)
        if trainer.epoch == 0 and trainer.is_main:  # interrupted before its first epoch ended
            print(f"note: {resume} has no finished epoch to continue from: training starts at the first",
                  file=sys.stderr)
    else:
        rule_spec = plugins.rule(rule)
        model_spec = plugins.model(model)
        model_options = {k: v for k, v in (("depth", depth), ("width", width), ("activation", activation)) if v is not None}
        unknown = set(model_options) - set(model_spec.options)
        if unknown:
            raise UserError(f"model '{model}' has no setting --{', --'.join(sorted(unknown))}")
        for key, text in parse_pairs(model_opt, "--model-opt").items():
            if key not in model_spec.options:
                known = ", ".join(sorted(model_spec.options)) or "none"
                raise UserError(f"model '{model}' has no setting '{key}' (settings: {known})")
            if key in model_options:
                raise UserError(f"--{key} and --model-opt {key} both given: give one")
            model_options[key] = parse_value(text, model_spec.options[key])
        rule_options = {
            k: parse_value(v, rule_spec.options.get(k, "")) for k, v in parse_pairs(opt, "--opt").items()
        }
        config = TrainConfig(
            rule=rule, dataset=dataset, model=model, rule_options=rule_options, model_options=model_options,
            latent_dim=latent_dim, epochs=20 if epochs is None else epochs, batch_size=batch_size, lr=lr,
            group_lr={k: parse_value(v, 0.0) for k, v in parse_pairs(group_lr, "--group-lr").items()},
            optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule, seed=seed,
            device=device, data_dir=data_dir, eval_every=eval_every, divergence_factor=divergence_factor,
            compile=compile, validation_fraction=validation_fraction, validation_seed=validation_seed,
        )
        check_config(config, registry=plugins)  # before any work, each field named by its flag
        trainer = new_trainer(config, out_dir, progress=not quiet, check=check)
    try:
        summary = trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; checkpoints of finished epochs in {trainer.out_dir} are intact: continue with "
            f"--resume {trainer.out_dir}"
        ) from None
    if fid:
        summary = add_fid(trainer, fid, fid_weights)
    if trainer.is_main:  # under torchrun, one summary table, not one per process
        _print_summary(summary, trainer.out_dir)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(show_header=False)
    for key in sorted(summary):
        if not isinstance(summary[key], (dict, list)):
            table.add_row(key, _fmt(summary[key]))
    out.print(f"run {run_dir}", markup=False, highlight=False)  # a line of its own: a title would wrap the path
    out.print(table)
