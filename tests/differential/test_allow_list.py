"""The allow-list itself: every rewrite the comparison can apply, and every ID a fixed case
expects, is a row of docs/compatibility.md, and the page's IDs are unique."""

from __future__ import annotations

import re

from .compare import COMPATIBILITY_PAGE, REWRITES, load_allow_list
from .test_cases import CASES


def test_every_rewrite_is_a_documented_difference() -> None:
    allowed = load_allow_list()
    assert set(REWRITES) <= set(allowed), set(REWRITES) - set(allowed)
    for _settings, case in CASES.values():
        assert case.expect_explained <= set(allowed)


def test_allow_list_ids_are_unique_and_each_has_a_reason() -> None:
    rows = [
        line for line in COMPATIBILITY_PAGE.read_text(encoding="utf-8").splitlines()
        if re.match(r"^\| `[a-z0-9-]+` \|", line)
    ]  # fmt: skip
    ids = [row.split("`")[1] for row in rows]
    assert len(ids) == len(set(ids)) == len(load_allow_list()) >= 10
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), row  # ID, kind, difference, reason
