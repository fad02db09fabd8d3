"""Building the hot path's named tuples (a match, a request descriptor, a status, an increment)
from one plain tuple of all their fields: a named tuple's own constructor runs a Python-level
``__new__`` and costs twice as much (docs/performance.md (What the hot path avoids))."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar, cast

_T = TypeVar("_T", bound=tuple[Any, ...])


def builder(cls: type[_T]) -> Callable[[tuple[Any, ...]], _T]:
    """``cls`` built from a tuple holding every field in order (no defaults filled in)."""
    return cast(Callable[[tuple[Any, ...]], _T], partial(tuple.__new__, cls))
