"""Decisions that must equal the reference's (docs/compatibility.md, "Matched behaviour"), on the
memory store with a fake clock: STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT with a local cache,
QUOTA_MODE next to unlimited descriptors, unlimited rules named in ``replaces``, share_threshold
counter keys and ``*`` in a descriptor key."""

from __future__ import annotations

import pytest
from support.clock import FakeClock

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.limiter.limiter import (
    MAX_UINT32,
    Decision,
    Limiter,
    LimiterOptions,
    Request,
    RequestDescriptor,
)
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: d
descriptors:
  - key: k
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: z
    rate_limit: {unit: hour, requests_per_unit: 0}
  - key: u
    rate_limit: {unlimited: true, name: free}
  - key: big
    rate_limit: {unit: hour, requests_per_unit: 10, replaces: [{name: free}]}
  - key: remote_address
    value: fo*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 5}
"""
STAR_KEY_RULES = """
domain: d
descriptors:
  - key: x*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
"""

NOW = 1_700_000_005
HOUR_START = NOW - NOW % 3600


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("d.yaml", RULES)])


def limiter(clock: FakeClock, store: MemoryStore, **options: object) -> Limiter:
    opts = LimiterOptions(expiration_jitter_max_seconds=0, **options)  # type: ignore[arg-type]
    return Limiter(store=store, stats=MemoryStats(), options=opts, clock=clock)


def request(*descriptors: tuple[tuple[str, str], int | None]) -> Request:
    return Request("d", tuple(RequestDescriptor((entry,), None, hits) for entry, hits in descriptors))


def counters(store: MemoryStore) -> dict[str, int]:
    return {key: value for key, (value, _expiry) in store._counters.items()}


def answer(decision: Decision) -> list[tuple[Code, int]]:
    return [(status.code, status.remaining) for status in decision.statuses]


STOP = {"stop_cache_key_increment_when_overlimit": True, "local_cache_size_in_bytes": 1 << 20}


async def test_stop_increment_keys_not_counted_are_not_cached_over(config, clock) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore(clock)
    rl = limiter(clock, store, **STOP)
    first = await rl.should_rate_limit(config, request((("z", "a"), None)))
    assert first.overall is Code.OVER_LIMIT
    second = await rl.should_rate_limit(config, request((("z", "a"), None), (("k", "c"), 4)))
    # z is over via the local cache, so k is not incremented: its count stays 0 (remaining 3).
    assert answer(second) == [(Code.OVER_LIMIT, 0), (Code.OK, 3)]
    third = await rl.should_rate_limit(config, request((("k", "c"), None)))
    assert (third.overall, answer(third)) == (Code.OK, [(Code.OK, 2)])
    assert counters(store) == {f"d_z_a_{HOUR_START}": 1, f"d_k_c_{HOUR_START}": 1}


async def test_stop_increment_remaining_of_keys_not_incremented(config, clock) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore(clock)
    rl = limiter(clock, store, stop_cache_key_increment_when_overlimit=True)
    decision = await rl.should_rate_limit(config, request((("k", "a"), None), (("z", "a"), None)))
    assert answer(decision) == [(Code.OK, 3), (Code.OVER_LIMIT, 0)]
    # The reference writes the key it did not increment (INCRBY 0 with its expiry): so do we.
    assert counters(store) == {f"d_k_a_{HOUR_START}": 0, f"d_z_a_{HOUR_START}": 1}


async def test_quota_mode_skips_unlimited_descriptors(config, clock) -> None:  # type: ignore[no-untyped-def]
    rl = limiter(clock, MemoryStore(clock), quota_mode=True)
    decision = await rl.should_rate_limit(config, request((("u", "1"), None), (("z", "1"), None)))
    assert decision.overall is Code.OVER_LIMIT
    # A descriptor without any rule still passes as a quota descriptor.
    decision = await rl.should_rate_limit(config, request((("none", "1"), None), (("z", "1"), None)))
    assert decision.overall is Code.OK


async def test_unlimited_rule_is_never_replaced(config, clock) -> None:  # type: ignore[no-untyped-def]
    rl = limiter(clock, MemoryStore(clock))
    decision = await rl.should_rate_limit(config, request((("u", "1"), None), (("big", "1"), None)))
    assert answer(decision) == [(Code.OK, MAX_UINT32), (Code.OK, 9)]


async def test_share_threshold_key_when_the_request_key_is_shorter(config, clock) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore(clock)
    rl = limiter(clock, store)
    await rl.should_rate_limit(config, request((("remote_address", "foo1"), None)))
    decision = await rl.should_rate_limit(config, request((("remote", "address_foo2"), None)))
    assert answer(decision) == [(Code.OK, 3)]  # both share one counter
    assert counters(store) == {f"d_remote_address_fo*_{HOUR_START}": 2}


async def test_star_in_a_descriptor_key_is_a_wildcard(clock) -> None:  # type: ignore[no-untyped-def]
    config = load_config([ConfigFile("star.yaml", STAR_KEY_RULES)])
    store = MemoryStore(clock)
    rl = limiter(clock, store)
    decision = await rl.should_rate_limit(config, request((("xyz", "v"), None)))
    assert answer(decision) == [(Code.OK, 1)]
    decision = await rl.should_rate_limit(config, request((("xa", "w"), None)))
    assert answer(decision) == [(Code.OK, 1)]
    # share_threshold on the key pattern: "<request key>_<pattern>" as the reference builds it.
    assert counters(store) == {f"d_xyz_x*_{HOUR_START}": 1, f"d_xa_x*_{HOUR_START}": 1}
