"""The counter-store contract: the few async methods every backend implements. All rate-limit
logic lives in ``limiter.limiter``; a store only adds numbers to keys (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from ratelimit_svc.limiter.algorithms import Step, StepResult


class Increment(NamedTuple):
    """Add ``hits`` to counter ``key``, whose window is ``window`` seconds long; the counter may be
    dropped ``ttl`` seconds from now (window length plus jitter)."""

    key: str
    hits: int
    window: int
    ttl: int


class CounterStore(Protocol):
    """The whole backend contract."""

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        """Apply every increment in one round trip; return each counter's value after it."""
        ...

    async def get(self, keys: Sequence[str]) -> list[int]:
        """Current values of the counters (0 for a missing one), in one round trip."""
        ...

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        """Check and charge every step as one atomic operation at ``now`` (microseconds), as
        ``limiter.algorithms`` defines it; with ``refund``, undo one charge of each step instead
        (docs/algorithms.md)."""
        ...

    async def ping(self) -> None:
        """Raise BackendError unless the backend answers."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


class StatsScope(Protocol):
    """Where a component reports its own numbers, under names relative to the scope (the
    reference's stats scopes, e.g. ``ratelimit.redis_pool``). Values are read at each flush, so
    a store keeps plain attributes and pays nothing per request."""

    def scope(self, name: str) -> StatsScope:
        """The child scope ``<this>.<name>``."""
        ...

    def gauge(self, name: str, read: Callable[[], int]) -> None:
        """Report ``read()`` as the gauge ``<scope>.<name>``."""
        ...

    def counter(self, name: str, read_total: Callable[[], int]) -> None:
        """Report the running total ``read_total()`` as the counter ``<scope>.<name>``."""
        ...
