"""The API reference lists every public name of the package face, linked to where it is defined
(CI's `mkdocs build --strict` fails when such a link does not resolve to a documented object)."""

from __future__ import annotations

from pathlib import Path

import fa_rules

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "index.md"


def test_every_public_name_is_in_the_api_reference():
    text = REFERENCE.read_text()
    missing = [name for name in fa_rules.__all__ if f"[`{name}`][{fa_rules._EXPORTS[name]}.{name}]" not in text]
    assert not missing, f"public names without an entry in docs/reference/index.md: {missing}"


DOCS = REFERENCE.parent.parent


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text` (header and separator rows included)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def section(text: str, heading: str) -> str:
    """`text` from the heading line to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start: end if end != -1 else len(text)]


def test_every_built_in_model_and_dataset_is_in_the_training_page_with_its_settings():
    from fa_rules.plugins.manager import build_registry

    registry = build_registry(autoload=False)
    text = (DOCS / "training.md").read_text()
    models = {name: row for row in table_rows(section(text, "## Models"))
              for name in (c.strip("` ") for c in row[0].split(","))}
    for name, spec in registry.models.items():
        assert name in models, f"model '{name}' is missing from the models table of docs/training.md"
        for key, value in spec.options.items():
            if key == "blocks":  # every model's split points: said once below the table
                continue
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            assert f"{key}={shown}" in models[name][1], f"model '{name}': {key}={shown} is not in its settings cell"
    datasets = {row[0].strip("`") for row in table_rows(section(text, "## Datasets"))}
    assert set(registry.datasets) <= datasets, set(registry.datasets) - datasets


# the feedback-alignment page's Settings table names the rules so
FA_LABELS = {"feedback_alignment": "FA", "direct_feedback_alignment": "DFA", "indirect_feedback_alignment": "IFA",
             "sign_symmetry": "sign symmetry", "kolen_pollack": "Kolen-Pollack", "brsf": "brSF", "frsf": "frSF",
             "direct_random_target_projection": "DRTP", "bidirectional_fa": "bidirectional FA",
             "bidirectional_dfa": "bidirectional DFA", "weight_mirror": "weight mirror"}


def test_the_feedback_alignment_settings_table_lists_exactly_each_rules_options():
    from fa_rules.plugins.manager import build_registry

    registry = build_registry(autoload=False)
    text = (DOCS / "rules" / "feedback-alignment.md").read_text()
    documented = {(row[0].strip("`"), label) for row in table_rows(section(text, "## Settings"))[2:]
                  for label in row[1].split(", ")}
    declared = {(option, FA_LABELS[name]) for name in FA_LABELS for option in registry.rule(name).options}
    assert declared - documented == set(), "options missing from the table"
    assert documented - declared == set(), "options the table gives rules that do not have them"
