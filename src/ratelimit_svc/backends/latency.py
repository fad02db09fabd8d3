"""How long the backend takes: a bounded latency and error record around any ``CounterStore``.

``TimedStore`` times each ``increment``, ``get`` and ``settle`` the limiter makes and hands it to a
``LatencyRecorder``, which keeps, per operation, a histogram of fixed log-spaced buckets for each
``SLOT_SECONDS`` slot of the last ``WINDOW_SECONDS``: memory does not depend on the request rate,
recording is a clock read, a ``bisect`` and an addition, and p50/p99 over the last minute are read
from the summed buckets (within one bucket's width, 20%). Errors (``BackendError``: failures,
timeouts, a circuit breaker failing fast) are counted in the same slots. The operator's console
shows it (docs/console.md).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.algorithms import Step, StepResult
from ratelimit_svc.limiter.store import CounterStore, Increment

SLOT_SECONDS = 5
WINDOW_SECONDS = 60
_SLOTS = WINDOW_SECONDS // SLOT_SECONDS
# Upper bounds in milliseconds: 10 µs growing by 20% a bucket to about 60 s; one more for beyond.
BOUNDS_MS: tuple[float, ...] = tuple(0.01 * 1.2**i for i in range(86))
OPERATIONS = ("increment", "get", "settle")

_perf_counter = time.perf_counter
_T = TypeVar("_T")


class _Slot:
    __slots__ = ("errors", "histograms", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.histograms = {op: [0] * (len(BOUNDS_MS) + 1) for op in OPERATIONS}
        self.errors = dict.fromkeys(OPERATIONS, 0)


class LatencyRecorder:
    """Per-operation latency histograms and error counts over the last ``WINDOW_SECONDS``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots: deque[_Slot] = deque(maxlen=_SLOTS)
        self._current = _Slot(-1)

    def record(self, operation: str, milliseconds: float, *, error: bool = False) -> None:
        number = int(self._clock()) // SLOT_SECONDS
        slot = self._current
        if slot.number != number:
            slot = self._current = _Slot(number)
            self._slots.append(slot)
        slot.histograms[operation][bisect_left(BOUNDS_MS, milliseconds)] += 1
        if error:
            slot.errors[operation] += 1

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per operation: calls, errors, p50 and p99 in milliseconds (None: no calls)."""
        oldest = int(self._clock()) // SLOT_SECONDS - _SLOTS + 1
        slots = [s for s in self._slots if s.number >= oldest]
        result: dict[str, dict[str, float | int | None]] = {}
        for op in OPERATIONS:
            histograms = [s.histograms[op] for s in slots]
            counts = [sum(column) for column in zip(*histograms, strict=True)]
            calls = sum(counts)
            result[op] = {
                "calls": calls,
                "errors": sum(s.errors[op] for s in slots),
                "p50_ms": _quantile(counts, calls, 0.50),
                "p99_ms": _quantile(counts, calls, 0.99),
            }
        return result


def _quantile(counts: Sequence[int], total: int, q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (None when there is nothing)."""
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return round(BOUNDS_MS[min(index, len(BOUNDS_MS) - 1)], 3)
    return round(BOUNDS_MS[-1], 3)


class TimedStore:
    """A ``CounterStore`` that records each ``increment``, ``get`` and ``settle`` of ``inner``
    (one coroutine per call: the inner store's awaitable is handed to ``_timed``)."""

    def __init__(self, inner: CounterStore, recorder: LatencyRecorder) -> None:
        self.inner = inner
        self.recorder = recorder

    def increment(self, increments: Sequence[Increment]) -> Coroutine[Any, Any, list[int]]:
        return self._timed("increment", _perf_counter(), self.inner.increment(increments))

    def get(self, keys: Sequence[str]) -> Coroutine[Any, Any, list[int]]:
        return self._timed("get", _perf_counter(), self.inner.get(keys))

    def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> Coroutine[Any, Any, list[StepResult]]:
        return self._timed("settle", _perf_counter(), self.inner.settle(steps, now, refund=refund))

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()

    async def _timed(self, operation: str, started: float, call: Awaitable[_T]) -> _T:
        try:
            result = await call
        except BackendError:
            self.recorder.record(operation, (_perf_counter() - started) * 1e3, error=True)
            raise
        self.recorder.record(operation, (_perf_counter() - started) * 1e3)
        return result
