"""In-process counters (BACKEND_TYPE=memory): the same keys and windows as Redis, expired in the
background, each operation done without yielding to the event loop (docs/backends.md (Memory)).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ratelimit_svc.limiter.algorithms import (
    Step,
    StepResult,
    batch_admitted,
    charged_state,
    charges,
    check,
    refunded_state,
)
from ratelimit_svc.limiter.store import Increment

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import Settings

SWEEP_INTERVAL_SECONDS = 1.0


class MemoryStore:
    """Counters in a dict: key → [value, expires_at] (for the algorithms of docs/algorithms.md,
    [*state, expires_at]); expiry buckets per second for the sweep."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counters: dict[str, list[int]] = {}
        self._expiry_buckets: dict[int, set[str]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._counters)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        now = int(self._clock())
        counters = self._counters
        results = []
        for key, hits, _window, ttl in increments:
            entry = counters.get(key)
            if entry is None or entry[1] <= now:
                entry = counters[key] = [0, 0]
            entry[0] += hits
            expires_at = now + ttl
            if entry[1] != expires_at:
                entry[1] = expires_at
                self._expiry_buckets.setdefault(expires_at, set()).add(key)
            results.append(entry[0])
        return results

    async def get(self, keys: Sequence[str]) -> list[int]:
        now = int(self._clock())
        results = []
        for key in keys:
            entry = self._counters.get(key)
            results.append(entry[0] if entry is not None and entry[1] > now else 0)
        return results

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        """Check and charge ``steps`` as one atomic operation (docs/algorithms.md); ``now`` in
        microseconds. ``refund`` undoes a charge of each step instead (and returns nothing)."""
        counters = self._counters
        second = now // 1_000_000
        states: list[tuple[int, ...] | None] = []
        for step in steps:
            entry = counters.get(step.key)
            states.append(None if entry is None or entry[-1] <= second else tuple(entry[:-1]))
        if refund:
            for step, state in zip(steps, states, strict=True):
                new = refunded_state(step, state)
                entry = counters.get(step.key)
                if new is not None and entry is not None:
                    entry[:-1] = new
            return []
        checked = [check(step, now, state) for step, state in zip(steps, states, strict=True)]
        admitted = batch_admitted(steps, [ok for ok, _, _ in checked])
        results = []
        for step, (ok, a, b) in zip(steps, checked, strict=True):
            result = StepResult(ok, charges(step, ok, admitted), a, b)
            if result.charged:
                state, lifetime = charged_state(step, now, result)
                # Whole seconds, never shorter than the state's life.
                self._store(step.key, state, (now + lifetime) // 1_000_000 + 1)
            results.append(result)
        return results

    def _store(self, key: str, state: tuple[int, ...], expires_at: int) -> None:
        entry = self._counters.get(key)
        if entry is None or entry[-1] != expires_at:
            self._expiry_buckets.setdefault(expires_at, set()).add(key)
        self._counters[key] = [*state, expires_at]

    async def ping(self) -> None:
        return None

    def sweep(self) -> int:
        """Drop every expired counter; returns how many were dropped."""
        now = int(self._clock())
        dropped = 0
        for second in [s for s in self._expiry_buckets if s <= now]:
            for key in self._expiry_buckets.pop(second):
                entry = self._counters.get(key)
                if entry is not None and entry[-1] <= now:
                    del self._counters[key]
                    dropped += 1
        return dropped

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            self.sweep()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


async def open_store(settings: Settings, clock: Callable[[], float]) -> MemoryStore:
    store = MemoryStore(clock)
    store.start()
    return store
