"""REDIS_PERSECOND=true: ``PerSecondStore`` sends SECOND-unit counters to a second store and all
others to the main one, splitting and merging mixed batches (docs/backends.md (Per-second Redis)).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from ratelimit_svc.limiter.algorithms import Step, StepResult, refund_unadmitted
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

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        """Each store settles its own steps atomically; a batch spanning both is refunded where
        it was charged but not admitted as a whole (docs/algorithms.md)."""
        fast = [i for i, step in enumerate(steps) if step.seconds == PER_SECOND_WINDOW]
        if not fast:
            return await self.main.settle(steps, now, refund=refund)
        if len(fast) == len(steps):
            return await self.per_second.settle(steps, now, refund=refund)
        fast_set = set(fast)
        slow = [i for i in range(len(steps)) if i not in fast_set]
        fast_results, slow_results = await _both(
            self.per_second.settle([steps[i] for i in fast], now, refund=refund),
            self.main.settle([steps[i] for i in slow], now, refund=refund),
        )
        if refund:
            return []
        results = [StepResult(False, False, 0, 0)] * len(steps)
        for index, result in zip(fast, fast_results, strict=True):
            results[index] = result
        for index, result in zip(slow, slow_results, strict=True):
            results[index] = result
        return await refund_unadmitted(self, steps, results, now)

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
    # Its answer is a list, not the tuple typeshed says for two arguments, and compiled code
    # (docs/performance.md, Compiled modules) checks the type of what it awaits: awaited as Any,
    # as the limiter does.
    gathering: Any = asyncio.gather(first, second, return_exceptions=True)
    a, b = await gathering
    for result in (a, b):
        if isinstance(result, BaseException):
            raise result
    return a, b
