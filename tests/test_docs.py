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
