"""The `fa-rules` command line: thin wrappers over core and plugins, no training logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fa_rules import __version__
from fa_rules.core.errors import UserError

app = typer.Typer(
    name="fa-rules",
    help="Train and compare credit-assignment rules (backprop, feedback and feature alignment, ...).",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()


def _version(value: bool):
    if value:
        out.print(f"fa-rules {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
):
    """fa-rules: composable credit-assignment rules on one torch.func engine."""


def _registry():
    from fa_rules.plugins.manager import get_registry

    registry = get_registry()
    for plugin, error in registry.failures:
        print(f"warning: plugin '{plugin}' failed to load: {error}", file=sys.stderr)
    return registry


def _parse_value(text: str, default: Any, what: str) -> Any:
    """Parse `text` to the type of `default` (bool, int, float, str)."""
    try:
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise UserError(f"{what} expects a {type(default).__name__}, got '{text}'") from None
    return text


def _parse_pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} expects KEY=VALUE, got '{item}'")
        pairs[key.strip()] = value.strip()
    return pairs


@app.command()
def train(
    rule: str = typer.Option("backprop", "--rule", "-r", help="Credit-assignment rule (see `fa-rules rules`)."),
    dataset: str = typer.Option("digits", "--dataset", "-d", help="Dataset (see `fa-rules datasets`)."),
    model: str = typer.Option("mlp", "--model", "-m", help="Model family (see `fa-rules models`)."),
    depth: Optional[int] = typer.Option(None, help="mlp: number of hidden blocks."),
    width: Optional[int] = typer.Option(None, help="mlp: units per hidden block."),
    activation: Optional[str] = typer.Option(None, help="tanh, relu, leaky_relu or asinh."),
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
    fid_weights: Optional[Path] = typer.Option(
        None, "--fid-weights", help="Inception weights for --fid (else $FA_RULES_FID_WEIGHTS or torch hub's cache)."
    ),
):
    """Train a model with a credit-assignment rule; writes a run directory."""
    from fa_rules.core.trainer import TrainConfig
    from fa_rules.plugins.experiment import new_trainer, resume_trainer

    registry = _registry()
    if fid:  # missing Inception weights fail before a run directory is made
        from fa_rules.core.fid import resolve_weights

        resolve_weights(fid_weights)
    if resume is not None:
        trainer = resume_trainer(resume, epochs, progress=not quiet)
    else:
        rule_spec = registry.rule(rule)
        model_spec = registry.model(model)
        model_options = {k: v for k, v in (("depth", depth), ("width", width), ("activation", activation)) if v is not None}
        unknown = set(model_options) - set(model_spec.options)
        if unknown:
            raise UserError(f"model '{model}' has no setting --{', --'.join(sorted(unknown))}")
        rule_options = {
            k: _parse_value(v, rule_spec.options.get(k, ""), f"--opt {k}") for k, v in _parse_pairs(opt, "--opt").items()
        }
        config = TrainConfig(
            rule=rule, dataset=dataset, model=model, rule_options=rule_options, model_options=model_options,
            latent_dim=latent_dim, epochs=20 if epochs is None else epochs, batch_size=batch_size, lr=lr,
            group_lr={k: _parse_value(v, 0.0, f"--group-lr {k}") for k, v in _parse_pairs(group_lr, "--group-lr").items()},
            optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, lr_schedule=lr_schedule, seed=seed,
            device=device, data_dir=data_dir,
        )
        trainer = new_trainer(config, out_dir, progress=not quiet)
    if fid:  # FID at the end of training: checked first, computed after the run (plugins.experiment)
        from fa_rules.plugins.experiment import add_fid, check_fid_request

        check_fid_request(trainer, fid, fid_weights)
    summary = trainer.run()
    if fid:
        summary = add_fid(trainer, fid, fid_weights)
    if trainer.is_main:  # under torchrun, one summary table, not one per process
        _print_summary(summary, trainer.out_dir)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title=f"run {run_dir}", show_header=False)
    for key in sorted(summary):
        if not isinstance(summary[key], (dict, list)):
            table.add_row(key, _fmt(summary[key]))
    out.print(table)


@app.command()
def rules(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered rules with their task, source distribution and summary."""
    registry = _registry()
    rows = []
    for name, spec in sorted(registry.rules.items()):
        rows.append({
            "name": name,
            "aliases": list(spec.aliases),
            "task": spec.task,
            "distribution": registry.source("rules", name).distribution,
            "plugin": registry.source("rules", name).plugin,
            "summary": spec.summary,
            "options": spec.options,
            "models": list(spec.models) if spec.models else None,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="credit-assignment rules")
    for col in ("name", "task", "distribution", "summary", "options"):
        table.add_column(col)
    for r in rows:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        table.add_row(name, r["task"], r["distribution"], r["summary"], options)
    out.print(table)


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered datasets."""
    registry = _registry()
    rows = [
        {"name": n, "shape": list(s.shape), "classes": s.num_classes, "summary": s.summary,
         "distribution": registry.source("datasets", n).distribution}
        for n, s in sorted(registry.datasets.items())
    ]
    _list_table("datasets", rows, as_json)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered model families and their settings."""
    registry = _registry()
    rows = [
        {"name": n, "options": s.options, "summary": s.summary,
         "distribution": registry.source("models", n).distribution}
        for n, s in sorted(registry.models.items())
    ]
    _list_table("models", rows, as_json)


def _list_table(title: str, rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=title)
    for col in rows[0] if rows else ():
        table.add_column(col)
    for r in rows:
        table.add_row(*(", ".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else _fmt(x)
                        for x in r.values()))
    out.print(table)


# -- command modules: each defines its commands with `@app.command()` on the app above ----------
# (add one import line per module here)
import fa_rules.cli.benchmark  # noqa: E402,F401  fa-rules benchmark
import fa_rules.cli.generative  # noqa: E402,F401  fa-rules reconstruct, probe, sample, fid


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)  # plain print: one line, never re-wrapped
    sys.exit(code)


def main() -> None:
    """Entry point: user mistakes become one line and exit code 2, never a traceback."""
    from fa_rules.core.distributed import DistributedError
    from fa_rules.core.trainer import Diverged

    try:
        app()  # standalone: typer reports its own usage errors (exit 2)
    except UserError as e:
        _fail(str(e), 2)
    except (Diverged, DistributedError) as e:
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _fail("interrupted; checkpoints of finished epochs are intact (continue with --resume DIR)", 130)
