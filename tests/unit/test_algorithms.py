"""docs/algorithms.md on the memory store with a fake clock: the pure functions by table, the
documented bound of every algorithm as a property over any arrival pattern, the boundary burst,
several limits per rule, charge only when admitted and the IETF response headers."""

from __future__ import annotations

import math
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import FakeClock

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.limiter.algorithms import (
    US,
    Algorithm,
    Step,
    StepResult,
    check,
    gcra_interval,
    sliding_weighted,
    verdict,
)
from ratelimit_svc.limiter.limiter import (
    Code,
    Decision,
    Limiter,
    LimiterOptions,
    Request,
    RequestDescriptor,
)
from ratelimit_svc.stats.registry import MemoryStats

T = TypeVar("T")
START = 1_699_999_980.0  # a multiple of 60 s (and of 10 s): windows below align to it

RULES = """
domain: alg
descriptors:
  - key: fixed
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 5}
  - key: sliding
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 5, algorithm: sliding_window}
  - key: token
    rate_limit:
      {unit: second, unit_multiplier: 10, requests_per_unit: 5, algorithm: token_bucket, burst: 3}
  - key: minute_fixed
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: minute_sliding
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: sliding_window}
  - key: minute_token
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: token_bucket}
  - key: two
    rate_limit:
      - {unit: second, requests_per_unit: 2}
      - {unit: minute, requests_per_unit: 3, algorithm: sliding_window}
  - key: careful
    charge_only_when_admitted: true
    rate_limit: {unit: minute, requests_per_unit: 10}
  - key: strict
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: shadowed
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: token_bucket}
"""

WINDOW = 10 * US
LIMIT = 5
BURST = 3


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (the memory store answers at once) without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the memory store path awaited something")


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("alg.yaml", RULES)])


def limiter_for(clock: FakeClock, **options: Any) -> tuple[Limiter, MemoryStats, MemoryStore]:
    stats = MemoryStats()
    store = MemoryStore(clock)
    opts = LimiterOptions(expiration_jitter_max_seconds=0, **options)
    return Limiter(store=store, stats=stats, options=opts, clock=clock), stats, store


def request(*keys: str, hits: int | None = None) -> Request:
    return Request("alg", tuple(RequestDescriptor(((k, ""),), None, hits) for k in keys))


async def ask(limiter: Limiter, config: RateLimitConfig, *keys: str, hits: int | None = None) -> Decision:
    return await limiter.should_rate_limit(config, request(*keys, hits=hits))


# -- the pure functions, by table ----------------------------------------------------------------


def step(algorithm: Algorithm, hits: int = 1, p1: int = 0, p2: int = WINDOW, *, limit: int = LIMIT) -> Step:
    return Step(algorithm, "k", hits, limit, p1, p2, 60, False, True, 10)


@pytest.mark.parametrize(
    ("previous", "start", "now", "expected"),
    [
        (10, 0, 0, 10),  # the whole previous window still counts
        (10, 0, WINDOW // 2, 5),  # half of it
        (10, 0, WINDOW - 1, 0),  # floor: a sliver of a request is no request
        (3, 0, WINDOW // 3, 2),  # 3 * 2/3
        (0, 0, 5, 0),
    ],
)
def test_sliding_weight(previous: int, start: int, now: int, expected: int) -> None:
    assert sliding_weighted(previous, start, WINDOW, now) == expected


@pytest.mark.parametrize(
    ("state", "now", "hits", "admitted", "a", "b"),
    [
        (None, 100, 1, True, 0, 0),
        ((WINDOW, 2, 8), WINDOW + WINDOW // 2, 1, False, 2, 8),  # 4 + 2 + 1 > 5
        ((WINDOW, 2, 8), WINDOW + WINDOW - 1, 3, True, 2, 8),  # 0 + 2 + 3 = 5
        ((0, 4, 1), WINDOW + 1, 2, True, 0, 4),  # rolled over: previous 4 weighs 3; 3 + 2 = 5
        ((0, 4, 1), WINDOW + 1, 3, False, 0, 4),  # 3 + 3 > 5
        ((0, 4, 1), 2 * WINDOW + 1, 5, True, 0, 0),  # two windows later: forgotten
    ],
)
def test_sliding_check(
    state: tuple[int, ...] | None, now: int, hits: int, admitted: bool, a: int, b: int
) -> None:
    start = now - now % WINDOW
    ok, got_a, got_b = check(step(Algorithm.SLIDING_WINDOW, hits, start), now, state)
    assert (ok, got_a, got_b) == (admitted, a, b)


def test_gcra_interval_rounds_up() -> None:
    assert gcra_interval(5, WINDOW) == 2 * US
    assert gcra_interval(3, US) == 333_334  # never faster than 3 per second
    assert gcra_interval(10**9, US) == 1


@pytest.mark.parametrize(
    ("tat", "now", "hits", "admitted"),
    [
        (None, 10 * US, 3, True),  # a full bucket holds the burst
        (None, 10 * US, 4, False),
        (5 * US, 10 * US, 3, True),  # a theoretical arrival in the past is now
        (14 * US, 10 * US, 1, True),  # 14 + 2 - 10 = 6 s: exactly the tolerance (3 x 2 s)
        (16 * US, 10 * US, 1, False),  # 8 s > 6 s
    ],
)
def test_gcra_check(tat: int | None, now: int, hits: int, admitted: bool) -> None:
    interval = gcra_interval(LIMIT, WINDOW)
    s = step(Algorithm.TOKEN_BUCKET, hits, interval, BURST * interval)
    ok, effective, _ = check(s, now, None if tat is None else (tat,))
    assert (ok, effective) == (admitted, max(tat or 0, now))


def test_gcra_verdict_counts_tokens_and_time_to_the_next_one() -> None:
    interval = gcra_interval(LIMIT, WINDOW)  # 2 s
    s = step(Algorithm.TOKEN_BUCKET, 1, interval, BURST * interval)
    now = 100 * US
    full = verdict(s, StepResult(True, True, now, 0), now)
    assert (full.capacity, full.capacity - full.used, full.reset_us) == (BURST, BURST - 1, 0)
    empty_tat = now + BURST * interval  # no token left
    over = verdict(s, StepResult(False, False, empty_tat, 0), now)
    assert over.used > over.capacity
    assert over.reset_us == interval  # one token refills in one interval


# -- the documented bounds, over any arrival pattern ---------------------------------------------

arrivals = st.lists(
    st.tuples(st.integers(0, 4_000), st.integers(1, 3)),  # (ms since the previous one, hits)
    min_size=1,
    max_size=60,
)


def run_pattern(config: RateLimitConfig, key: str, pattern: Sequence[tuple[int, int]], offset_ms: int) -> list[tuple[int, int]]:
    """(time in µs, hits) of every admitted request."""
    clock = FakeClock(START + offset_ms / 1000)
    limiter, _, _ = limiter_for(clock)
    admitted = []
    for gap_ms, hits in pattern:
        clock.advance(gap_ms / 1000)
        decision = drive(ask(limiter, config, key, hits=hits))
        if decision.overall is Code.OK:
            admitted.append((int(clock() * US), hits))
    return admitted


def intervals(admitted: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(length, hits admitted) of every interval from one admission to a later one."""
    out = []
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, hits in admitted[i:]:
            total += hits
            out.append((end - start, total))
    return out


@settings(max_examples=150, deadline=None)
@given(pattern=arrivals, offset_ms=st.integers(0, 20_000))
def test_fixed_window_bound(config: RateLimitConfig, pattern: list[tuple[int, int]], offset_ms: int) -> None:
    per_window: dict[int, int] = {}
    for at, hits in run_pattern(config, "fixed", pattern, offset_ms):
        per_window[at // WINDOW] = per_window.get(at // WINDOW, 0) + hits
    assert all(total <= LIMIT for total in per_window.values())


@settings(max_examples=150, deadline=None)
@given(pattern=arrivals, offset_ms=st.integers(0, 20_000))
def test_sliding_window_bound(config: RateLimitConfig, pattern: list[tuple[int, int]], offset_ms: int) -> None:
    admitted = run_pattern(config, "sliding", pattern, offset_ms)
    for length, total in intervals(admitted):
        if length <= WINDOW:  # docs/algorithms.md: at most limit + ceil(limit * d / W)
            assert total <= LIMIT + math.ceil(LIMIT * length / WINDOW), (length, total)
    per_window: dict[int, int] = {}
    for at, hits in admitted:
        per_window[at // WINDOW] = per_window.get(at // WINDOW, 0) + hits
    assert all(total <= LIMIT for total in per_window.values())


@settings(max_examples=150, deadline=None)
@given(pattern=arrivals, offset_ms=st.integers(0, 20_000))
def test_token_bucket_bound(config: RateLimitConfig, pattern: list[tuple[int, int]], offset_ms: int) -> None:
    for length, total in intervals(run_pattern(config, "token", pattern, offset_ms)):
        # burst + rate * t, in integers: total * W <= burst * W + t * limit
        assert total * WINDOW <= BURST * WINDOW + length * LIMIT, (length, total)


# -- the boundary burst --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "admitted_across_boundary"),
    [("minute_fixed", 200), ("minute_sliding", 100), ("minute_token", 101)],
)
async def test_boundary_burst(config: RateLimitConfig, key: str, admitted_across_boundary: int) -> None:
    """100 per minute: 100 requests at 00:59 and 100 at 01:00. A fixed window admits all 200;
    the sliding window still weighs the first 100 fully and a token bucket refilled one token in
    the second between them (docs/algorithms.md, the picture)."""
    clock = FakeClock(START + 59)
    limiter, _, _ = limiter_for(clock)
    ok = 0
    for _ in range(150):
        ok += (await ask(limiter, config, key)).overall is Code.OK
    clock.advance(1)
    for _ in range(150):
        ok += (await ask(limiter, config, key)).overall is Code.OK
    assert ok == admitted_across_boundary


# -- several limits per descriptor, per-limit stats ----------------------------------------------


async def test_two_limits_the_most_restrictive_decides(config: RateLimitConfig) -> None:
    """2 per second (fixed) and 3 per minute (sliding). Without charge_only_when_admitted each
    limit is charged by its own rule, as separate descriptors would be."""
    clock = FakeClock(START)
    limiter, stats, _ = limiter_for(clock)
    first = await ask(limiter, config, "two")
    assert first.overall is Code.OK
    assert first.statuses[0].remaining == 1  # per second: 1 left; per minute: 2 left
    assert first.statuses[0].rule is not None and first.statuses[0].rule.requests_per_unit == 2
    second = await ask(limiter, config, "two")
    assert second.overall is Code.OK and second.statuses[0].remaining == 0
    third = await ask(limiter, config, "two")  # over the per-second limit
    assert third.overall is Code.OVER_LIMIT
    assert third.statuses[0].rule is not None and third.statuses[0].rule.unit.name == "SECOND"
    clock.advance(1)
    fourth = await ask(limiter, config, "two")  # a new second, but the minute's 3 are used
    assert fourth.overall is Code.OVER_LIMIT
    assert fourth.statuses[0].rule is not None and fourth.statuses[0].rule.unit.name == "MINUTE"
    assert fourth.statuses[0].reset_seconds > 0
    prefix = "ratelimit.service.rate_limit.alg.two"
    assert stats.get(f"{prefix}.per_second.total_hits") == 4
    assert stats.get(f"{prefix}.per_second.over_limit") == 1
    assert stats.get(f"{prefix}.per_minute_sliding_window.total_hits") == 4
    assert stats.get(f"{prefix}.per_minute_sliding_window.over_limit") == 1
    assert stats.get(f"{prefix}.total_hits") == 0  # a list's limits count only under their own


# -- charge only when admitted -------------------------------------------------------------------


async def test_a_rejected_request_charges_no_charge_only_rule(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, _ = limiter_for(clock)
    assert (await ask(limiter, config, "careful", "strict")).overall is Code.OK
    for _ in range(5):  # "strict" (1 per minute) rejects every one of these
        assert (await ask(limiter, config, "careful", "strict")).overall is Code.OVER_LIMIT
    # "careful" was charged for the one admitted request only: 9 of 10 left.
    alone = await ask(limiter, config, "careful")
    assert alone.statuses[0].remaining == 8  # 10 - 1 admitted - this one


async def test_global_charge_only_when_admitted_keeps_the_reference_keys(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, store = limiter_for(clock, charge_only_when_admitted=True)
    await ask(limiter, config, "minute_fixed", "strict")
    await ask(limiter, config, "minute_fixed", "strict")  # rejected by strict: charges nothing
    window = int(START) - int(START) % 60
    assert await store.get([f"alg_minute_fixed__{window}", f"alg_strict__{window}"]) == [1, 1]


async def test_without_the_option_a_rejected_request_still_counts(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, store = limiter_for(clock)
    await ask(limiter, config, "minute_fixed", "strict")
    await ask(limiter, config, "minute_fixed", "strict")
    window = int(START) - int(START) % 60
    assert await store.get([f"alg_minute_fixed__{window}", f"alg_strict__{window}"]) == [2, 2]


async def test_shadow_mode_rules_never_reject_the_batch(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, _ = limiter_for(clock)
    for _ in range(3):  # the shadowed bucket (1 token) is empty after the first
        decision = await ask(limiter, config, "careful", "shadowed")
        assert decision.overall is Code.OK
    assert (await ask(limiter, config, "careful")).statuses[0].remaining == 6  # all 4 charged


# -- keys ----------------------------------------------------------------------------------------


async def test_keys_of_the_new_algorithms(config: RateLimitConfig) -> None:
    clock = FakeClock(START + 3)
    limiter, _, store = limiter_for(clock)
    await ask(limiter, config, "sliding", "token", "two", "minute_fixed")
    keys = set(store._counters)
    window = int(START) - int(START) % 60
    assert keys == {
        "sw:{alg_sliding__}10",
        "tb:{alg_token__}10",
        f"fw:{{alg_two__}}1:{int(START) + 3}",
        "sw:{alg_two__}60",
        f"alg_minute_fixed__{window}",  # a plain fixed window: the reference's key
    }


# -- IETF RateLimit headers ----------------------------------------------------------------------


async def test_ietf_headers_name_the_deciding_limit(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, _ = limiter_for(clock, ietf_headers=True)
    decision = await ask(limiter, config, "two", "minute_fixed")
    headers = dict(decision.headers)
    assert headers["RateLimit-Policy"] == '"alg.two.per_second";q=2;w=1'
    assert headers["RateLimit"] == '"alg.two.per_second";r=1;t=1'
    await ask(limiter, config, "two")
    over = dict((await ask(limiter, config, "two")).headers)
    assert over["RateLimit"] == '"alg.two.per_second";r=0;t=1'


async def test_ietf_headers_next_to_the_x_ratelimit_ones(config: RateLimitConfig) -> None:
    clock = FakeClock(START)
    limiter, _, _ = limiter_for(
        clock, ietf_headers=True, response_headers=("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
    )
    headers = dict((await ask(limiter, config, "token")).headers)
    assert headers["X-RateLimit-Limit"] == "5"
    assert headers["X-RateLimit-Remaining"] == "2"
    assert headers["RateLimit-Policy"] == '"alg.token";q=3;w=6'  # 3 tokens refill in 6 s
    assert headers["RateLimit"] == '"alg.token";r=2;t=0'
