"""What the compiled modules' source must avoid (docs/performance.md, Compiled modules): an
``await`` inside a ``finally``. Compiled, a coroutine that awaits in a finally while an exception
passes through leaves that exception behind as the thread's handled exception, and a later await
in any compiled finally raises it in place of what should have happened."""

from __future__ import annotations

import ast

import pytest
from support.compiled import COMPILED, ROOT


def awaits_in_finally(source: str) -> list[int]:
    """Line numbers of every await (``await``, ``async with``, ``async for``) in a finally."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try | ast.TryStar):
            for statement in node.finalbody:
                for inner in ast.walk(statement):
                    if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor):
                        lines.append(inner.lineno)
    return lines


def test_the_check_finds_an_await_in_a_finally() -> None:
    source = (
        "async def f(x):\n"
        "    try:\n"
        "        await x\n"
        "    finally:\n"
        "        if x:\n"
        "            await x.close()\n"
    )
    assert awaits_in_finally(source) == [6]
    assert awaits_in_finally(source.replace("finally:", "except BaseException:")) == []


@pytest.mark.parametrize("path", COMPILED)
def test_no_compiled_module_awaits_in_a_finally(path: str) -> None:
    source = (ROOT / "src" / path).read_text()
    assert awaits_in_finally(source) == [], f"{path}: await in a finally at these lines"
