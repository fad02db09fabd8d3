"""REDIS_PERSECOND=true: ``PerSecondStore`` sends SECOND-unit counters to a second store and all
others to the main one, splitting and merging mixed batches (docs/backends.md (Per-second Redis)).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar, cast

from ratelimit_svc.limiter.store import CounterStore, Increment

PER_SECOND_WINDOW = 1

_A = TypeVar("_A")
_B = TypeVar("_B")


class PerSecondStore:
    """A ``CounterStore`` that sends one-second counters to ``per_second`` and the rest to
    ``main``."""

    def __init__(self, main: CounterStore, per_second: CounterStore) -> None:
        self.main = main
        self.per_second = per_second

    def __repr__(self) -> str:
        return f"PerSecondStore(main={self.main!r}, per_second={self.per_second!r})"

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        fast = [i for i, inc in enumerate(increments) if inc.window == PER_SECOND_WINDOW]
        if not fast:
            return await self.main.increment(increments)
        if len(fast) == len(increments):
            return await self.per_second.increment(increments)
        fast_set = set(fast)
        slow = [i for i in range(len(increments)) if i not in fast_set]
        fast_values, slow_values = await _both(
            self.per_second.increment([increments[i] for i in fast]),
            self.main.increment([increments[i] for i in slow]),
        )
        results = [0] * len(increments)
        for index, value in zip(fast, fast_values, strict=True):
            results[index] = value
        for index, value in zip(slow, slow_values, strict=True):
            results[index] = value
        return results

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        main_values, fast_values = await _both(self.main.get(keys), self.per_second.get(keys))
        return [a + b for a, b in zip(main_values, fast_values, strict=True)]

    async def ping(self) -> None:
        await _both(self.main.ping(), self.per_second.ping())

    async def close(self) -> None:
        await _both(self.main.close(), self.per_second.close())



async def _both(first: Awaitable[_A], second: Awaitable[_B]) -> tuple[_A, _B]:
    """Both results; if either fails, its error once both have finished (nothing left running)."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    for result in (a, b):
        if isinstance(result, BaseException):
            raise result
    return cast(_A, a), cast(_B, b)
