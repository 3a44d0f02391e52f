"""`fa-rules rules`, `datasets`, `models`: what the installed plugins provide."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from fa_rules.cli.common import out, registry as load_registry
from fa_rules.cli.train import _fmt


def rules(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered rules with their task, the models they support, source distribution and summary."""
    registry = load_registry()
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
    for col in ("name", "task", "models", "distribution", "summary", "options"):
        table.add_column(col)
    for r in rows:
        name = r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        models = ", ".join(r["models"]) if r["models"] else "any"
        table.add_row(name, r["task"], models, r["distribution"], r["summary"], options)
    out.print(table)


def datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered datasets."""
    registry = load_registry()
    rows = [
        {"name": n, "shape": list(s.shape), "classes": s.num_classes, "summary": s.summary,
         "distribution": registry.source("datasets", n).distribution}
        for n, s in sorted(registry.datasets.items())
    ]
    _list_table("datasets", rows, as_json)


def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the registered model families and their settings."""
    registry = load_registry()
    rows = [
        {"name": n, "options": s.options, "summary": s.summary,
         "distribution": registry.source("models", n).distribution}
        for n, s in sorted(registry.models.items())
    ]
    rows.append({"name": "torchvision:NAME", "options": {"image_size": 0, "blocks": ""},
                 "summary": "any torchvision classification model by name (weights=None), images through the input "
                            "adapter; its class's plain settings are options too",
                 "distribution": "torchvision"})
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
