"""docs/algorithms.md on every backend that runs the settle step: memory, a single Redis (with and
without pipelining), a Redis Cluster, Redis through Sentinel and REDIS_PERSECOND. Random request
sequences get the same answers as on the memory store; concurrent hits on one key admit exactly
what the algorithm allows; a request rejected by one descriptor leaves charge-only descriptors'
counters unchanged, whether or not their keys share a server or a slot."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from support.clock import FakeClock
from test_contract import OPENERS

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.backends.redis import open_redis_store
from ratelimit_svc.backends.redis.scripts import SETTLE_SHA
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.limiter.algorithms import Algorithm, Step
from ratelimit_svc.limiter.limiter import (
    Code,
    Limiter,
    LimiterOptions,
    Request,
    RequestDescriptor,
)
from ratelimit_svc.limiter.store import CounterStore
from ratelimit_svc.settings.model import RedisSettings
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: algs
descriptors:
  - key: sliding
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 10, algorithm: sliding_window}
  - key: token
    rate_limit: {unit: second, unit_multiplier: 10, requests_per_unit: 5, algorithm: token_bucket, burst: 3}
  - key: five_minutes
    rate_limit: {unit: minute, unit_multiplier: 5, requests_per_unit: 7}
  - key: two
    rate_limit:
      - {unit: second, requests_per_unit: 4, algorithm: token_bucket}
      - {unit: minute, requests_per_unit: 9, algorithm: sliding_window}
  - key: two_long
    rate_limit:
      - {unit: minute, requests_per_unit: 4, algorithm: token_bucket}
      - {unit: hour, requests_per_unit: 9, algorithm: sliding_window}
  - key: careful
    charge_only_when_admitted: true
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: careful_bucket
    charge_only_when_admitted: true
    rate_limit: {unit: minute, requests_per_unit: 100, algorithm: token_bucket}
  - key: strict
    rate_limit: {unit: minute, requests_per_unit: 5}
"""

BACKENDS = ["memory", "redis", "redis_pipelined", "cluster", "sentinel", "persecond"]
KEYS = ["sliding", "token", "five_minutes", "two", "careful", "careful_bucket", "strict"]


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("algs.yaml", RULES)])


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, clock: FakeClock
) -> AsyncIterator[CounterStore]:
    opened = await OPENERS[request.param](clock, request, True)
    try:
        yield opened
    finally:
        await opened.close()


def limiter(store: CounterStore, clock: FakeClock, **options: Any) -> Limiter:
    opts = LimiterOptions(expiration_jitter_max_seconds=0, **options)
    return Limiter(store=store, stats=MemoryStats(), options=opts, clock=clock)


def req(*pairs: tuple[str, str], hits: int | None = None) -> Request:
    return Request("algs", tuple(RequestDescriptor((pair,), None, hits) for pair in pairs))


Answer = tuple[Code, tuple[tuple[Code, int, int], ...]]


async def play(lim: Limiter, clock: FakeClock, config: RateLimitConfig, seed: int) -> list[Answer]:
    """A random sequence of requests (one to three descriptors, 1-3 hits, 0-3 s apart)."""
    rng = random.Random(seed)
    answers = []
    for _ in range(25):
        clock.advance(rng.choice([0, 0, 0.05, 0.3, 1, 2.5]))
        keys = rng.sample(KEYS, rng.randint(1, 3))
        decision = await lim.should_rate_limit(
            config, req(*((k, f"s{seed}") for k in keys), hits=rng.randint(1, 3))
        )
        answers.append(
            (
                decision.overall,
                tuple((s.code, s.remaining, s.reset_seconds) for s in decision.statuses),
            )
        )
    return answers


async def test_same_answers_as_the_memory_store(
    store: CounterStore, clock: FakeClock, config: RateLimitConfig
) -> None:
    for seed in range(12):
        start = 1_700_000_000.0 + seed * 7.3
        memory_clock = FakeClock(start)
        expected = await play(limiter(MemoryStore(memory_clock), memory_clock), memory_clock, config, seed)
        clock.now = start  # the store's clock too (the memory store expires by it)
        got = await play(limiter(store, clock), clock, config, seed)
        assert got == expected, seed


arrivals = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.2, 1.0, 2.5, 5.0]),  # seconds since the previous request
        st.integers(1, 4),  # hits
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True),
    pattern=arrivals,
    offset=st.floats(0, 600),
)
def test_redis_answers_as_memory_for_any_arrival_pattern(
    redis_server: Any,
    config: RateLimitConfig,
    keys: list[str],
    pattern: list[tuple[float, int]],
    offset: float,
) -> None:
    """The property form of the test above, on a single Redis: the same descriptors (one or two)
    under any arrival pattern get the same answers as on the memory store."""
    redis_server.flushall()
    request = req(*((k, "p") for k in keys))

    async def answers(store: CounterStore, clock: FakeClock) -> list[Answer]:
        lim = limiter(store, clock)
        out = []
        for gap, hits in pattern:
            clock.advance(gap)
            decision = await lim.should_rate_limit(config, request._replace(hits_addend=hits))
            out.append(
                (decision.overall, tuple((s.code, s.remaining, s.reset_seconds) for s in decision.statuses))
            )
        return out

    async def on_redis() -> list[Answer]:
        store = await open_redis_store(
            RedisSettings(socket_type="tcp", url=redis_server.url),
            op_timeout=5.0, startup_initial_interval=0.05, startup_max_interval=0.5, startup_max_elapsed=10.0,
        )
        try:
            return await answers(store, FakeClock(1_700_000_000.0 + offset))
        finally:
            await store.close()

    memory_clock = FakeClock(1_700_000_000.0 + offset)
    expected = asyncio.run(answers(MemoryStore(memory_clock), memory_clock))
    assert asyncio.run(on_redis()) == expected


# Periods of 10 s and more: the clock is fake but Redis expires keys in real time, and a loaded
# machine may take seconds for 30 requests.
@pytest.mark.parametrize(
    ("key", "allowed"), [("sliding", 10), ("token", 3), ("five_minutes", 7), ("two_long", 4)]
)
async def test_concurrent_hits_admit_exactly_the_limit(
    store: CounterStore,
    clock: FakeClock,
    config: RateLimitConfig,
    key: str,
    allowed: int,
) -> None:
    lim = limiter(store, clock)
    decisions = await asyncio.gather(*(lim.should_rate_limit(config, req((key, "c"))) for _ in range(30)))
    admitted = sum(d.overall is Code.OK for d in decisions)
    assert admitted == allowed


async def test_concurrent_charge_only_requests(store: CounterStore, clock: FakeClock, config: RateLimitConfig) -> None:
    """30 at once on "careful" (100/min, charged only when admitted) and "strict" (5/min):
    exactly 5 pass, and "careful" counted exactly those 5."""
    lim = limiter(store, clock)
    decisions = await asyncio.gather(
        *(lim.should_rate_limit(config, req(("careful", "c"), ("strict", "c"))) for _ in range(30))
    )
    assert sum(d.overall is Code.OK for d in decisions) == 5
    alone = await lim.should_rate_limit(config, req(("careful", "c")))
    assert alone.statuses[0].remaining == 100 - 5 - 1


@pytest.mark.parametrize("charged", ["careful", "careful_bucket"])
async def test_a_rejected_request_leaves_charge_only_counters_unchanged(
    store: CounterStore, clock: FakeClock, config: RateLimitConfig, charged: str
) -> None:
    lim = limiter(store, clock)
    for _ in range(5):
        assert (await lim.should_rate_limit(config, req((charged, "x"), ("strict", "x")))).overall is Code.OK
    before = (await lim.should_rate_limit(config, req((charged, "x")))).statuses[0].remaining
    assert before == 100 - 5 - 1
    for _ in range(4):
        rejected = await lim.should_rate_limit(config, req((charged, "x"), ("strict", "x")))
        assert rejected.overall is Code.OVER_LIMIT
        assert rejected.statuses[0].code is Code.OK  # admitted on its own, but not charged
    after = (await lim.should_rate_limit(config, req((charged, "x")))).statuses[0].remaining
    assert after == before - 1  # this request only; nothing for the four rejected


async def test_refund_undoes_a_charge(store: CounterStore, clock: FakeClock) -> None:
    now = int(clock() * 1_000_000)
    start = now - now % 60_000_000
    steps = [
        Step(Algorithm.FIXED_WINDOW, "rf:{a}f", 2, 10, start, 60_000_000, 60, True, True, 60),
        Step(Algorithm.SLIDING_WINDOW, "rf:{a}s", 2, 10, start, 60_000_000, 0, True, True, 60),
        Step(Algorithm.TOKEN_BUCKET, "rf:{a}t", 2, 10, 6_000_000, 60_000_000, 0, True, True, 60),
    ]
    first = await store.settle(steps, now)
    assert [r.charged for r in first] == [True, True, True]
    await store.settle(steps, now, refund=True)
    again = await store.settle(steps, now)
    assert [(r.a, r.b) for r in again] == [(r.a, r.b) for r in first]


async def test_the_script_is_loaded_again_after_script_flush(
    request: pytest.FixtureRequest, clock: FakeClock, config: RateLimitConfig
) -> None:
    server = request.getfixturevalue("redis_server")
    store = await OPENERS["redis"](clock, request, True)
    try:
        lim = limiter(store, clock)
        await lim.should_rate_limit(config, req(("token", "n")))
        admin = server.client()
        admin.script_flush()
        assert admin.script_exists(SETTLE_SHA) == [False]
        again = await lim.should_rate_limit(config, req(("token", "n")))  # NOSCRIPT, then EVAL
        assert again.statuses[0].remaining == 1  # a burst of 3, two taken
        assert admin.script_exists(SETTLE_SHA) == [True]
    finally:
        await store.close()


async def test_cluster_charge_only_across_slots_is_refunded(
    request: pytest.FixtureRequest, clock: FakeClock, config: RateLimitConfig
) -> None:
    """The two descriptors' keys live in different slots, so the script runs once per slot and
    the charged one is refunded (docs/algorithms.md, "Where the guarantees hold")."""
    store = await OPENERS["cluster"](clock, request, True)
    try:
        lim = limiter(store, clock)
        window = int(clock()) - int(clock()) % 60
        keys = [f"algs_careful_z_{window}", f"algs_strict_z_{window}"]
        assert key_slot(keys[0].encode()) != key_slot(keys[1].encode())
        for _ in range(5):
            await lim.should_rate_limit(config, req(("careful", "z"), ("strict", "z")))
        for _ in range(3):
            decision = await lim.should_rate_limit(config, req(("careful", "z"), ("strict", "z")))
            assert decision.overall is Code.OVER_LIMIT
        # "careful" counted the 5 admitted; "strict" (a plain rule) all 8, as the reference does.
        assert await store.get(keys) == [5, 8]
    finally:
        await store.close()
