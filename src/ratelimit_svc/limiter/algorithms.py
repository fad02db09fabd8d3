"""The counting algorithms beyond the fixed window (docs/algorithms.md): pure arithmetic on a
counter's state with the time passed in, tested with tables and property tests.

A ``Step`` is one limit's part of one request: which algorithm, which key, how many hits, and the
window or refill parameters precomputed by the limiter. A store applies a batch of steps
atomically (``settle``): every step is checked against its state, the batch is admitted when every
binding step is, and each step is charged by its algorithm's rule (``charges``). The in-memory
store runs the functions below directly; the Redis store runs a Lua transcription of them
(``backends.redis_scripts``) and the property tests hold the two to the same answers. All times
are integer microseconds since the epoch; windows align to multiples of their length since the
epoch, so every replica agrees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ratelimit_svc.config.rules import Algorithm

__all__ = [
    "Algorithm",
    "Step",
    "StepResult",
    "Verdict",
    "charges",
    "check",
    "gcra_interval",
    "refund_unadmitted",
    "sliding_weighted",
    "verdict",
]

US = 1_000_000


class Step(NamedTuple):
    """One limit of one request, ready for a store.

    ``p1``/``p2`` by algorithm: fixed and sliding window: window start / window length; token
    bucket:
    emission interval / burst tolerance (``burst * interval``). ``ttl`` (seconds): a fixed
    window's counter TTL (window plus jitter); for the others, how long a state outlives its use
    (one window or period). ``conditional``: charged only if
    the whole batch is admitted (charge only when admitted); ``binding``: its rejection rejects
    the batch (False for shadow-mode rules); ``seconds``: the window or refill period (a store
    may route by it, as REDIS_PERSECOND does).
    """

    algorithm: Algorithm
    key: str
    hits: int
    limit: int
    p1: int
    p2: int
    ttl: int
    conditional: bool
    binding: bool
    seconds: int


class StepResult(NamedTuple):
    """What a store saw and did for one step. ``a``/``b`` by algorithm: fixed window: the count
    before / 0; sliding window: current window's count before / previous window's count; token
    bucket: the effective theoretical arrival time before (never earlier than now) / 0."""

    admitted: bool
    charged: bool
    a: int
    b: int


class Verdict(NamedTuple):
    """A step's answer in the limiter's terms: ``used`` counts like a fixed window's counter after
    the hits (above ``capacity`` means over limit), ``reset_us`` is the time until the window
    resets (fixed) or until one more request would be admitted (sliding, token bucket)."""

    capacity: int
    used: int
    reset_us: int


def sliding_weighted(previous: int, start: int, length: int, now: int) -> int:
    """The previous window's count weighted by the part of it still inside the sliding window.

    Computed in IEEE doubles exactly as the Lua script computes it, so both stores agree.
    """
    return math.floor(float(previous) * float(length - (now - start)) / float(length))


def gcra_interval(requests: int, period_us: int) -> int:
    """Microseconds between two tokens, rounded up so the rate never exceeds the configured one."""
    return max(1, -(-period_us // max(requests, 1)))


def check(step: Step, now: int, state: tuple[int, ...] | None) -> tuple[bool, int, int]:
    """(admitted, a, b) for ``step`` against ``state`` (None: no state yet).

    States: fixed window ``(count,)``; sliding window ``(start, current, previous)``; token bucket
    ``(tat,)``.
    """
    algorithm, hits, limit = step.algorithm, step.hits, step.limit
    if algorithm is Algorithm.SLIDING_WINDOW:
        start, length = step.p1, step.p2
        current, previous = _sliding_counts(state, start, length)
        weighted = sliding_weighted(previous, start, length, now)
        return weighted + current + hits <= limit, current, previous
    if algorithm is Algorithm.TOKEN_BUCKET:
        tat = max(state[0] if state else 0, now)
        return tat + hits * step.p1 - now <= step.p2, tat, 0
    count = state[0] if state else 0
    return count + hits <= limit, count, 0


def _sliding_counts(state: tuple[int, ...] | None, start: int, length: int) -> tuple[int, int]:
    if state is None:
        return 0, 0
    stored_start, current, previous = state
    if stored_start == start:
        return current, previous
    if stored_start == start - length:
        return 0, current
    return 0, 0


def charges(step: Step, admitted: bool, batch_admitted: bool) -> bool:
    """Whether ``step`` is charged: a fixed window counts every request, as the reference does;
    the others count admitted ones; a conditional step needs the whole batch admitted."""
    if step.conditional and not batch_admitted:
        return False
    return admitted or step.algorithm is Algorithm.FIXED_WINDOW


def charged_state(
    step: Step, now: int, result: StepResult
) -> tuple[tuple[int, ...], int]:
    """The state after charging ``step`` and how long it must live (microseconds): as long as it
    matters plus ``ttl`` seconds (one window or period), so that replicas whose clocks differ a
    little still find it, as fixed-window counters outlive their window by the jitter."""
    if step.algorithm is Algorithm.SLIDING_WINDOW:
        return (step.p1, result.a + step.hits, result.b), 2 * step.p2 + step.ttl * US
    if step.algorithm is Algorithm.TOKEN_BUCKET:
        tat = result.a + step.hits * step.p1
        return (tat,), tat - now + step.ttl * US
    return (result.a + step.hits,), step.ttl * US


def refunded_state(step: Step, state: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Undo one charge of ``step`` (best effort: the state may have moved on since)."""
    if state is None:
        return None
    if step.algorithm is Algorithm.SLIDING_WINDOW:
        start, current, previous = state
        if start != step.p1:
            return state
        return start, max(0, current - step.hits), previous
    if step.algorithm is Algorithm.TOKEN_BUCKET:
        return (state[0] - step.hits * step.p1,)
    return (max(0, state[0] - step.hits),)


def batch_admitted(steps: Sequence[Step], admitted: Sequence[bool]) -> bool:
    return all(ok or not step.binding for step, ok in zip(steps, admitted, strict=True))


def verdict(step: Step, result: StepResult, now: int) -> Verdict:
    """The limiter's view of a step's result (see ``Verdict``)."""
    hits = step.hits
    if step.algorithm is Algorithm.SLIDING_WINDOW:
        start, length, limit = step.p1, step.p2, step.limit
        current, previous = result.a, result.b
        weighted = sliding_weighted(previous, start, length, now)
        used = weighted + current + hits
        if result.charged:
            current += hits
        return Verdict(limit, used, _sliding_wait(limit, current, previous, start, length, now))
    if step.algorithm is Algorithm.TOKEN_BUCKET:
        interval, tolerance = step.p1, step.p2
        burst = tolerance // interval
        tat = result.a + hits * interval if result.charged else result.a
        available = (tolerance - (tat - now)) // interval  # whole tokens left
        used = burst - available + (0 if result.charged else hits)
        # One more request fits once its token would land within the tolerance.
        wait = max(0, tat + interval - tolerance - now)
        return Verdict(burst, used, wait)
    return Verdict(step.limit, result.a + hits, step.p1 + step.p2 - now)


def _sliding_wait(
    limit: int, current: int, previous: int, start: int, length: int, now: int
) -> int:
    """Microseconds until one more request fits the sliding window (0: it fits now)."""

    def earliest(cur: int, prev: int, begin: int, at_least: int) -> int | None:
        room = limit - cur - 1  # what the weighted previous count may still be
        if room < 0:
            return None
        if prev <= room:
            return at_least
        # floor(prev * (length - e) / length) <= room  if  prev * (length - e) < (room + 1) * length
        elapsed = length - ((room + 1) * length - 1) // prev
        return max(begin + elapsed, at_least)

    soonest = earliest(current, previous, start, now)
    if soonest is None:  # not before the next window, where the current count becomes previous
        soonest = earliest(0, current, start + length, start + length)
    return max(0, (soonest if soonest is not None else start + 2 * length) - now)


class _Settles(Protocol):
    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]: ...


async def refund_unadmitted(
    store: _Settles, steps: Sequence[Step], results: list[StepResult], now: int
) -> list[StepResult]:
    """For a batch settled in several atomic parts (different Redis Cluster slots, the per-second
    and the main Redis): refund, through ``store``, the conditional steps a part charged although
    the batch as a whole was not admitted, and mark them uncharged. Until the refund lands another
    request may see that quota as used (docs/algorithms.md, "Where the guarantees hold")."""
    if batch_admitted(steps, [r.admitted for r in results]):
        return results
    due = [
        index
        for index, (step, result) in enumerate(zip(steps, results, strict=True))
        if step.conditional and result.charged
    ]
    if due:
        await store.settle([steps[i] for i in due], now, refund=True)
        for index in due:
            results[index] = results[index]._replace(charged=False)
    return results
