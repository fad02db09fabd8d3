"""A memory store that tests may subclass: the real ``MemoryStore`` can be a compiled class
(setup.py), which Python classes cannot inherit from (docs/performance.md, Compiled modules)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.limiter.store import Increment


class OpenMemoryStore:
    """Every ``MemoryStore`` method, passed to a real one; override any of them."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.inner = MemoryStore() if clock is None else MemoryStore(clock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        return await self.inner.increment(increments)

    async def get(self, keys: Sequence[str]) -> list[int]:
        return await self.inner.get(keys)
