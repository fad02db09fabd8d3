"""A circuit breaker and an in-flight bound around any ``CounterStore``, so that a failing or hung
backend makes calls fail fast instead of piling up (docs/reliability.md (When the backend fails)).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ratelimit_svc.errors import BackendError, CounterError
from ratelimit_svc.limiter.algorithms import Step, StepResult
from ratelimit_svc.limiter.store import CounterStore, Increment, StatsScope

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # the cool-down is over and one probe is on its way


class CircuitBreakerStore:
    """A ``CounterStore`` that guards ``inner`` with an in-flight bound and a circuit breaker.

    ``failure_threshold`` 0 turns the breaker off; ``max_in_flight`` 0 removes the bound.
    """

    def __init__(
        self,
        inner: CounterStore,
        *,
        failure_threshold: int = 5,
        cooldown: float = 2.0,
        max_in_flight: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        scope: StatsScope | None = None,
    ) -> None:
        self.inner = inner
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._last_error = ""
        self._in_flight = 0
        # Totals since start, for stats and tests.
        self.opened_total = 0
        self.rejected_total = 0  # failed fast because the circuit was open
        self.overloaded_total = 0  # failed fast because max_in_flight calls were waiting
        if scope is not None:  # ours: ratelimit.backend_breaker.*
            scope.gauge("open", lambda: int(self._state is not BreakerState.CLOSED))
            scope.gauge("in_flight", lambda: self._in_flight)
            scope.counter("opened", lambda: self.opened_total)
            scope.counter("rejected", lambda: self.rejected_total)
            scope.counter("overloaded", lambda: self.overloaded_total)

    def __repr__(self) -> str:
        return f"CircuitBreakerStore({self.inner!r}, state={self.state.value})"

    # -- what health and stats read ---------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """CLOSED, OPEN (failing fast, or cool-down over and no probe sent yet) or HALF_OPEN."""
        return self._state

    @property
    def in_flight(self) -> int:
        """Calls waiting on the backend right now."""
        return self._in_flight

    def breaker_stats(self) -> dict[str, int]:
        """Gauges and totals under short names (``open`` is 1 unless the circuit is closed)."""
        return {
            "open": int(self._state is not BreakerState.CLOSED),
            "in_flight": self._in_flight,
            "opened_total": self.opened_total,
            "rejected_total": self.rejected_total,
            "overloaded_total": self.overloaded_total,
        }

    # -- the CounterStore contract ---------------------------------------------------------------

    # Each call is one coroutine (``_call``'s), handed the inner store's method and its
    # arguments: no lambda and no second coroutine per request (docs/performance.md).

    def increment(self, increments: Sequence[Increment]) -> Coroutine[Any, Any, list[int]]:
        return self._call(self.inner.increment, increments)

    def get(self, keys: Sequence[str]) -> Coroutine[Any, Any, list[int]]:
        return self._call(self.inner.get, keys)

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        return await self._call(lambda: self.inner.settle(steps, now, refund=refund))

    async def ping(self) -> None:
        # Not bounded by max_in_flight: the health check pings at its own fixed rate, and load
        # shedding must not make a reachable backend look unhealthy.
        await self._call(self.inner.ping, bounded=False)

    async def close(self) -> None:
        await self.inner.close()

    # -- the machinery ----------------------------------------------------------------------------

    async def _call(
        self, operation: Callable[..., Awaitable[_T]], *args: Any, bounded: bool = True
    ) -> _T:
        """``operation(*args)`` if the circuit and the in-flight bound let it go to the backend;
        the operation is called only then (nothing is created that would never be awaited)."""
        probe = self._admit()
        if bounded and 0 < self.max_in_flight <= self._in_flight:
            if probe:
                self._state = BreakerState.OPEN  # no probe was sent; the next call may send one
            self.overloaded_total += 1
            raise BackendError(
                f"backend overloaded: {self._in_flight} calls already waiting on it "
                f"(BACKEND_MAX_IN_FLIGHT={self.max_in_flight})"
            )
        self._in_flight += 1
        try:
            result = await operation(*args)
        except BackendError as exc:
            self._on_failure(str(exc), probe=probe)
            raise
        except CounterError:
            # The backend answered; it only refused one key (docs/backends.md, Error classes).
            self._on_success()
            raise
        except BaseException as exc:
            # Cancelled (or a bug): no answer. Unless this was the probe it proves nothing, but
            # a probe must never leave the circuit half-open for good.
            if probe:
                reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
                self._on_failure(f"the probe ended without an answer ({reason})", probe=True)
            raise
        finally:
            self._in_flight -= 1
        if self._state is not BreakerState.CLOSED or self._failures:
            self._on_success()
        return result

    def _admit(self) -> bool:
        """Fail fast unless this call may go to the backend; True if it is the half-open probe."""
        if self.failure_threshold <= 0 or self._state is BreakerState.CLOSED:
            return False
        if self._state is BreakerState.OPEN:
            remaining = self._opened_at + self.cooldown - self._clock()
            if remaining <= 0:
                self._state = BreakerState.HALF_OPEN
                return True
            detail = f"retrying in {remaining:.1f}s"
        else:
            detail = "a probe is in flight"
        self.rejected_total += 1
        raise BackendError(
            f"circuit open after {self._failures} consecutive backend failures ({detail}); "
            f"last error: {self._last_error}"
        )

    def _on_failure(self, message: str, *, probe: bool) -> None:
        """Count a failure. Only the probe decides a half-open circuit: a call admitted before
        the circuit opened may still be failing late."""
        self._last_error = message
        if self.failure_threshold <= 0:
            return
        self._failures += 1
        if probe or (
            self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
        ):
            if self._state is BreakerState.CLOSED:
                log.error(
                    "circuit open: %d consecutive backend failures, failing fast for %gs; "
                    "last error: %s",
                    self._failures,
                    self.cooldown,
                    message,
                )
                self.opened_total += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def _on_success(self) -> None:
        """Any answer closes the circuit: the backend works (even a call admitted earlier)."""
        if self._state is not BreakerState.CLOSED:
            log.warning("circuit closed: the backend answered the probe")
        self._state = BreakerState.CLOSED
        self._failures = 0
