"""The package layout: imports point one way (cli -> benchmark -> runs -> measures/plugins -> rules
-> models -> core), and the engine loads nothing outside itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fa_rules

PACKAGE = Path(fa_rules.__file__).parent

# part of fa_rules -> the parts it may import (besides itself)
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "rules": {"core", "models"},
    "plugins": {"core", "models", "rules"},
    "measures": {"core"},
    "plots": {"core"},
    "testing": {"core", "plugins"},
    "runs": {"core", "plugins", "measures", "plots"},
    "benchmark": {"core", "runs", "measures", "plugins", "plots"},
    "cli": {"core", "models", "rules", "plugins", "measures", "plots", "runs", "benchmark", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path) -> set[str]:
    """Top-level parts of fa_rules that a module imports anywhere (function-level imports too)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "fa_rules":
            # `from fa_rules import models`: a submodule; `from fa_rules import __version__`: the face
            modules = [f"fa_rules.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for name in modules:
            pieces = name.split(".")
            if pieces[0] != "fa_rules":
                continue
            if len(pieces) == 1 or pieces[1] == "__version__":
                parts.add("__init__")
            else:
                parts.add(pieces[1])
    return parts


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        graph.setdefault(part, set()).update(_imported_parts(path) - {part})
    return graph


def test_imports_point_one_way():
    wrong = {part: sorted(deps - ALLOWED[part]) for part, deps in import_graph().items() if deps - ALLOWED[part]}
    assert not wrong, f"imports against the layout: {wrong}"
    assert set(import_graph()) <= set(ALLOWED), "a new top-level part of fa_rules needs a place in ALLOWED"


def test_engine_imports_nothing_outside_core():
    code = "import sys, fa_rules.core; print(' '.join(sorted(m for m in sys.modules if m.startswith('fa_rules'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    outside = [m for m in loaded if m != "fa_rules" and not m.startswith("fa_rules.core")]
    assert loaded and not outside, outside


def test_public_face_resolves_every_name():
    for name in fa_rules.__all__:
        assert getattr(fa_rules, name) is not None, name
    from fa_rules import Network, Rule, RuleSpec, load_run, train  # noqa: F401  the documented spelling


def test_every_fa_rules_import_names_a_module_or_name_that_exists():
    """Function-level imports run only when their function does: a stale path after a move would
    fail late, in a user's run. Check every one of them now."""
    import importlib

    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("fa_rules"):
                try:
                    module = importlib.import_module(node.module)
                except ModuleNotFoundError:
                    missing.append(f"{path.relative_to(PACKAGE)}: {node.module}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            missing.append(f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("fa_rules"):
                        try:
                            importlib.import_module(alias.name)
                        except ModuleNotFoundError:
                            missing.append(f"{path.relative_to(PACKAGE)}: {alias.name}")
    assert not missing, missing
