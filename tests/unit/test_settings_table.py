"""The settings table in docs/configuration.md is generated from the settings model."""

from __future__ import annotations

from pathlib import Path

from ratelimit_svc.settings.model import Settings, variables
from ratelimit_svc.settings.table import markdown_table, render

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_docs_table_is_current() -> None:
    page = PAGE.read_text()
    assert render(page) == page, "docs/configuration.md is stale: run `make docs`"


def test_every_variable_is_documented_once() -> None:
    rows = list(variables(Settings()))
    assert all(row.doc for _, row, _ in rows), [v for v, row, _ in rows if not row.doc]
    table = markdown_table()
    for variable, _, _ in rows:
        assert table.count(f"| `{variable}` |") == 1, variable
