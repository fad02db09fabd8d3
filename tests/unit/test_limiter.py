"""How a request is answered, and the worked examples, on the memory store with a fake clock
(docs/configuration.md (How a request is answered, Worked examples))."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from support.clock import FakeClock
from support.stores import OpenMemoryStore

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.errors import NoConfigError, RequestError
from ratelimit_svc.limiter.limiter import (
    MAX_UINT32,
    Limiter,
    LimiterOptions,
    Request,
    RequestDescriptor,
)
from ratelimit_svc.limiter.matching import Override
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.limiter.windows import Code, RuleCounts, decide, near_threshold
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: second, requests_per_unit: 50}
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: key3
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: key4
    rate_limit: {unit: day, requests_per_unit: 10}
  - key: key5
    rate_limit: {unit: week, requests_per_unit: 10}
  - key: key6
    rate_limit: {unit: month, requests_per_unit: 10}
  - key: key7
    rate_limit: {unit: year, requests_per_unit: 10}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: unlimited
    rate_limit: {unlimited: true}
  - key: zero
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: named
    rate_limit: {unit: minute, requests_per_unit: 10, name: small}
  - key: premium
    rate_limit: {unit: minute, requests_per_unit: 100, name: big, replaces: [{name: small}]}
  - key: quota_a
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota_b
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: meta
    metadata: {team: a, nested: {x: 1}}
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: meta2
    metadata: {team: b, nested: {y: 2}, extra: true}
    rate_limit: {unit: minute, requests_per_unit: 5}
---
domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
"""


class CountingStore(OpenMemoryStore):
    """The memory store, recording every call the limiter makes."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.calls: list[tuple[str, list[Increment] | list[str]]] = []

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        self.calls.append(("increment", list(increments)))
        return await super().increment(increments)

    async def get(self, keys: Sequence[str]) -> list[int]:
        self.calls.append(("get", list(keys)))
        return await super().get(keys)


@pytest.fixture(scope="module")
def config() -> RateLimitConfig:
    return load_config([ConfigFile("basic.yaml", RULES)])


@pytest.fixture
def store(clock: FakeClock) -> CountingStore:
    return CountingStore(clock)


@pytest.fixture
def stats() -> MemoryStats:
    return MemoryStats()


def make_limiter(
    store: CountingStore, stats: MemoryStats, clock: FakeClock, **options: object
) -> Limiter:
    opts = LimiterOptions(expiration_jitter_max_seconds=0, **options)  # type: ignore[arg-type]
    return Limiter(store=store, stats=stats, options=opts, clock=clock)


def req(domain: str, *descriptors: RequestDescriptor, hits: int = 0) -> Request:
    return Request(domain, tuple(descriptors), hits)


def d(*entries: tuple[str, str], hits: int | None = None, override: Override | None = None) -> RequestDescriptor:
    return RequestDescriptor(tuple(entries), override, hits)


async def hit(limiter: Limiter, config: RateLimitConfig, request: Request, times: int = 1):  # type: ignore[no-untyped-def]
    decision = None
    for _ in range(times):
        decision = await limiter.should_rate_limit(config, request)
    return decision


# -- docs/configuration.md (Worked examples) ----------------------------------------------------

WINDOWS = [
    ("key1", Unit.SECOND, 1700000005, 1),
    ("key2", Unit.MINUTE, 1699999980, 35),
    ("key3", Unit.HOUR, 1699999200, 2795),
    ("key4", Unit.DAY, 1699920000, 6395),
    ("key5", Unit.WEEK, 1699488000, 92795),
    ("key6", Unit.MONTH, 1697760000, 351995),
    ("key7", Unit.YEAR, 1671408000, 2943995),
]


@pytest.mark.parametrize(("key", "unit", "window_start", "reset"), WINDOWS, ids=[w[1].name for w in WINDOWS])
async def test_windows_and_reset(config, store, stats, clock, key, unit, window_start, reset) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("basic", d((key, "foo"))))
    status = decision.statuses[0]
    assert status.rule is not None and status.rule.unit is unit
    assert status.reset_seconds == reset
    op, increments = store.calls[0]
    assert op == "increment"
    assert increments == [Increment(f"basic_{key}_foo_{window_start}", 1, unit.seconds, unit.seconds)]


async def test_example_a_first_hit(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("basic", d(("key1", "foo"))))
    assert decision.overall is Code.OK
    status = decision.statuses[0]
    assert (status.code, status.rule.requests_per_unit, status.rule.unit) == (Code.OK, 50, Unit.SECOND)  # type: ignore[union-attr]
    assert (status.remaining, status.reset_seconds) == (49, 1)
    assert store.calls == [("increment", [Increment("basic_key1_foo_1700000005", 1, 1, 1)])]
    assert stats.get("ratelimit.service.rate_limit.basic.key1.total_hits") == 1
    assert stats.get("ratelimit.service.rate_limit.basic.key1.within_limit") == 1


async def test_example_b_over_and_near(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    request = req("basic", d(("key2", "foo")))
    decision = await hit(limiter, config, request, 17)
    assert (decision.statuses[0].code, decision.statuses[0].remaining) == (Code.OK, 3)
    assert stats.get("ratelimit.service.rate_limit.basic.key2.near_limit") == 1
    decision = await hit(limiter, config, request, 4)
    status = decision.statuses[0]
    assert decision.overall is Code.OVER_LIMIT
    assert (status.code, status.remaining, status.reset_seconds) == (Code.OVER_LIMIT, 0, 35)
    assert stats.get("ratelimit.service.rate_limit.basic.key2.over_limit") == 1


async def test_example_b_local_cache_skips_backend(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, local_cache_size_in_bytes=1 << 20)
    request = req("basic", d(("key2", "foo")))
    await hit(limiter, config, request, 21)
    calls_before = len(store.calls)
    decision = await limiter.should_rate_limit(config, request)
    assert decision.statuses[0].code is Code.OVER_LIMIT
    assert len(store.calls) == calls_before  # the 22nd hit never reached the store
    assert stats.get("ratelimit.service.rate_limit.basic.key2.over_limit_with_local_cache") == 1
    assert stats.get("ratelimit.service.rate_limit.basic.key2.over_limit") == 2
    clock.advance(35)  # next window: the cache entry has expired
    decision = await limiter.should_rate_limit(config, request)
    assert decision.statuses[0].code is Code.OK
    assert len(store.calls) == calls_before + 1


async def test_example_c_hits_addend_crossing_limit(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    await hit(limiter, config, req("basic", d(("key2", "foo"))), 18)
    near_before = stats.get("ratelimit.service.rate_limit.basic.key2.near_limit")
    decision = await limiter.should_rate_limit(config, req("basic", d(("key2", "foo")), hits=5))
    assert decision.statuses[0].code is Code.OVER_LIMIT
    assert stats.get("ratelimit.service.rate_limit.basic.key2.over_limit") == 3
    assert stats.get("ratelimit.service.rate_limit.basic.key2.near_limit") - near_before == 2


async def test_example_d_unknown_domain(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("nope", d(("key1", "foo"))))
    assert decision.overall is Code.OK
    assert decision.statuses[0].code is Code.OK and decision.statuses[0].rule is None
    assert store.calls == []
    assert stats.get("ratelimit.service.rate_limit.nope.domain_not_found") == 1


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req("", d(("a", "b"))), "rate limit domain must not be empty"),
        (req("basic"), "rate limit descriptor list must not be empty"),
    ],
)
async def test_example_e_request_errors(config, store, stats, clock, request_, message) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    with pytest.raises(RequestError, match=f"^{message}$"):
        await limiter.should_rate_limit(config, request_)


async def test_no_config_loaded(store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    with pytest.raises(NoConfigError, match=r"^no rate limit configuration loaded$"):
        await limiter.should_rate_limit(None, req("basic", d(("key1", "x"))))


async def test_example_f_unlimited(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("basic", d(("unlimited", "x"))))
    status = decision.statuses[0]
    assert (status.code, status.remaining, status.rule) == (Code.OK, MAX_UINT32, None)
    assert store.calls == []
    assert not any("unlimited" in name for name in stats.snapshot())


async def test_example_g_headers(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    clock.now = 1699999980 + 2  # second 2 of a minute
    names = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
    rules = load_config([ConfigFile("g.yaml", "domain: g\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 10}\n")])
    limiter = make_limiter(store, stats, clock, response_headers=names)
    request = req("g", d(("k", "v")), d(("other", "x")))
    await hit(limiter, rules, request, 10)
    decision = await limiter.should_rate_limit(rules, request)
    assert [s.code for s in decision.statuses] == [Code.OVER_LIMIT, Code.OK]
    assert decision.headers == (("RateLimit-Limit", "10"), ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "58"))


async def test_headers_pick_smallest_remaining_and_none_without_limit(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    names = ("L", "R", "T")
    limiter = make_limiter(store, stats, clock, response_headers=names)
    decision = await limiter.should_rate_limit(config, req("basic", d(("key1", "a")), d(("key2", "a"))))
    assert decision.headers == (("L", "20"), ("R", "19"), ("T", "35"))
    decision = await limiter.should_rate_limit(config, req("basic", d(("none", "a"))))
    assert decision.headers == ()


async def test_example_h_share_threshold(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    await limiter.should_rate_limit(config, req("messaging", d(("files", "files/a.pdf"))))
    decision = await limiter.should_rate_limit(config, req("messaging", d(("files", "files/b.csv"))))
    assert decision.statuses[0].remaining == 8
    keys = [inc.key for _, incs in store.calls for inc in incs]  # type: ignore[union-attr]
    assert keys == ["messaging_files_files/*_1699999200"] * 2


async def test_example_i_nested(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    await limiter.should_rate_limit(
        config, req("messaging", d(("message_type", "marketing"), ("to_number", "2061111111")))
    )
    assert store.calls[0][1][0].key == "messaging_message_type_marketing_to_number_2061111111_1699920000"  # type: ignore[union-attr]
    assert stats.get("ratelimit.service.rate_limit.messaging.message_type_marketing.to_number.total_hits") == 1


# -- hits -------------------------------------------------------------------------------------

async def test_descriptor_hits_addend_zero_checks_only(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    await hit(limiter, config, req("basic", d(("key2", "a"))), 3)
    decision = await limiter.should_rate_limit(config, req("basic", d(("key2", "a"), hits=0), hits=7))
    assert decision.statuses[0].remaining == 17
    decision = await limiter.should_rate_limit(config, req("basic", d(("key2", "a"))))
    assert decision.statuses[0].remaining == 16


async def test_request_hits_addend_and_descriptor_override(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(
        config, req("basic", d(("key2", "a")), d(("key3", "a"), hits=4), hits=6)
    )
    assert [s.remaining for s in decision.statuses] == [14, 6]


# -- stats arithmetic (pure) ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("limit", "hits", "after", "shadow", "cached", "code", "remaining", "counts"),
    [
        (10, 1, 1, False, False, Code.OK, 9, (1, 0, 0, 1, 0, 0)),
        (10, 1, 9, False, False, Code.OK, 1, (1, 0, 1, 1, 0, 0)),
        (10, 5, 9, False, False, Code.OK, 1, (5, 0, 1, 5, 0, 0)),
        (10, 1, 11, False, False, Code.OVER_LIMIT, 0, (1, 1, 0, 0, 0, 0)),
        (10, 5, 13, False, False, Code.OVER_LIMIT, 0, (5, 3, 2, 0, 0, 0)),
        (10, 5, 12, False, False, Code.OVER_LIMIT, 0, (5, 2, 2, 0, 0, 0)),
        (10, 1, 11, True, False, Code.OK, 0, (1, 1, 0, 0, 1, 0)),
        (10, 5, 13, True, False, Code.OK, 0, (5, 3, 2, 0, 3, 0)),
        (10, 2, 0, False, True, Code.OVER_LIMIT, 0, (2, 2, 0, 0, 0, 2)),
        (10, 2, 0, True, True, Code.OK, 0, (2, 2, 0, 0, 2, 2)),
        (0, 1, 1, False, False, Code.OVER_LIMIT, 0, (1, 1, 0, 0, 0, 0)),
        (10, 0, 10, False, False, Code.OK, 0, (0, 0, 0, 0, 0, 0)),
        (10, 0, 11, False, False, Code.OVER_LIMIT, 0, (0, 0, 0, 0, 0, 0)),
    ],
)
def test_decide(limit, hits, after, shadow, cached, code, remaining, counts) -> None:  # type: ignore[no-untyped-def]
    near = near_threshold(limit, 0.8)
    got_code, got_remaining, got = decide(limit, hits, after, near, shadow=shadow, cached=cached)
    assert (got_code, got_remaining) == (code, remaining)
    assert (got.total_hits, got.over_limit, got.near_limit, got.within_limit, got.shadow_mode, got.over_limit_with_local_cache) == counts


@pytest.mark.parametrize("ratio", [0.8, 0.5, 1.0, 1.5])
def test_the_limiters_within_limit_shortcut_is_decides_answer(ratio: float) -> None:
    # The limiter answers a count at or below both the limit and the near-limit threshold without
    # calling decide (docs/performance.md): the answer it assumes must be decide's own.
    for limit in (0, 1, 5, 10, 100):
        near = near_threshold(limit, ratio)
        for hits in (0, 1, 3):
            for after in range(hits, min(near, limit) + 1):
                for shadow in (False, True):
                    code, remaining, got = decide(limit, hits, after, near, shadow=shadow)
                    assert (code, remaining) == (Code.OK, limit - after)
                    assert got == RuleCounts(total_hits=hits, within_limit=hits)


def test_default_jitter_is_uniform_in_its_range() -> None:
    limiter = Limiter(store=MemoryStore(), stats=MemoryStats())
    draws = [limiter.jitter(3) for _ in range(3000)]
    assert set(draws) == {0, 1, 2}
    assert all(abs(draws.count(n) - 1000) < 200 for n in range(3))


@pytest.mark.parametrize(("limit", "ratio", "near"), [(10, 0.8, 8), (20, 0.8, 16), (3, 0.8, 2), (5, 0.9, 4), (100, 0.7, 70)])
def test_near_threshold_float32(limit: int, ratio: float, near: int) -> None:
    assert near_threshold(limit, ratio) == near


# -- shadow, quota, replaces, overrides -------------------------------------------------------

async def test_shadow_rule_reports_but_does_not_enforce(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await hit(limiter, config, req("basic", d(("shadow", "x"))), 3)
    status = decision.statuses[0]
    assert decision.overall is Code.OK and status.code is Code.OK and status.remaining == 0
    assert status.rule is not None and status.rule.requests_per_unit == 2
    assert stats.get("ratelimit.service.rate_limit.basic.shadow.shadow_mode") == 1
    assert stats.get("ratelimit.service.rate_limit.basic.shadow.over_limit") == 1


async def test_global_shadow_mode(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, shadow_mode=True)
    decision = await hit(limiter, config, req("basic", d(("zero", "x"))))
    assert decision.overall is Code.OK
    assert decision.statuses[0].code is Code.OVER_LIMIT
    assert stats.get("ratelimit.service.global_shadow_mode") == 1


async def test_quota_mode_over_only_when_all_quota_rules_over(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    await limiter.should_rate_limit(config, req("basic", d(("quota_a", "x"))))
    decision = await limiter.should_rate_limit(config, req("basic", d(("quota_a", "x")), d(("quota_b", "x"))))
    assert [s.code for s in decision.statuses] == [Code.OVER_LIMIT, Code.OK]
    assert decision.overall is Code.OK
    decision = await limiter.should_rate_limit(config, req("basic", d(("quota_a", "x")), d(("quota_b", "x"))))
    assert decision.overall is Code.OVER_LIMIT


async def test_quota_rules_do_not_mask_normal_rule(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("basic", d(("quota_a", "x")), d(("zero", "x"))))
    assert decision.overall is Code.OVER_LIMIT


async def test_global_quota_mode_rule_less_descriptor_passes(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, quota_mode=True)
    decision = await limiter.should_rate_limit(config, req("basic", d(("zero", "x"))))
    assert decision.overall is Code.OVER_LIMIT
    decision = await limiter.should_rate_limit(config, req("basic", d(("zero", "x")), d(("nothing", "y"))))
    assert decision.overall is Code.OK


async def test_replaces_drops_named_rule(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("basic", d(("named", "u")), d(("premium", "u"))))
    assert decision.statuses[0].rule is None and decision.statuses[0].code is Code.OK
    assert decision.statuses[1].rule is not None and decision.statuses[1].rule.name == "big"
    assert [inc.key for inc in store.calls[0][1]] == ["basic_premium_u_1699999980"]  # type: ignore[union-attr]
    decision = await limiter.should_rate_limit(config, req("basic", d(("named", "u"))))
    assert decision.statuses[0].rule is not None and decision.statuses[0].rule.name == "small"


async def test_limit_override(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    request = req("basic", d(("key1", "foo"), override=Override(1, Unit.HOUR)))
    first = await limiter.should_rate_limit(config, request)
    second = await limiter.should_rate_limit(config, request)
    assert (first.statuses[0].code, second.statuses[0].code) == (Code.OK, Code.OVER_LIMIT)
    assert second.statuses[0].rule.unit is Unit.HOUR  # type: ignore[union-attr]
    assert stats.get("ratelimit.service.rate_limit.basic.key1_foo.over_limit") == 1
    with pytest.raises(RequestError):
        await limiter.should_rate_limit(config, req("basic", d(("key1", "foo"), override=Override(1, Unit.UNKNOWN))))


async def test_override_ignored_for_unknown_domain(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(config, req("zzz", d(("a", "b"), override=Override(0, Unit.SECOND))))
    assert decision.overall is Code.OK and store.calls == []


# -- dynamic metadata -------------------------------------------------------------------------

async def test_dynamic_metadata(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, dynamic_metadata=True)
    decision = await limiter.should_rate_limit(
        config,
        req("basic", d(("meta", "1")), d(("meta2", "1"), hits=2), d(("key1", "z"), override=Override(9, Unit.MINUTE)), hits=1),
    )
    assert decision.dynamic_metadata == {
        "domain": "basic",
        "descriptors": [
            {"entries": ["meta=1"]},
            {"entries": ["meta2=1"], "hitsAddend": 2},
            {"entries": ["key1=z"], "limit": {"requestsPerUnit": 9, "unit": "MINUTE"}},
        ],
        "hitsAddend": 1,
        "metadata": {"team": "a", "nested": {"x": 1, "y": 2}, "extra": True},
    }


async def test_dynamic_metadata_skips_over_limit_rules(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, dynamic_metadata=True)
    decision = await limiter.should_rate_limit(config, req("basic", d(("meta", "1"), hits=6), d(("meta2", "1"))))
    assert decision.dynamic_metadata is not None
    assert decision.dynamic_metadata["metadata"] == {"team": "b", "nested": {"y": 2}, "extra": True}


# -- STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT --------------------------------------------------

async def test_stop_increment_when_over(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, stop_cache_key_increment_when_overlimit=True)
    request = req("basic", d(("key2", "a")), d(("named", "a"), hits=11))
    decision = await limiter.should_rate_limit(config, request)
    assert [s.code for s in decision.statuses] == [Code.OK, Code.OVER_LIMIT]
    assert [v for v in await store.get(["basic_key2_a_1699999980", "basic_named_a_1699999980"])] == [0, 11]
    decision = await limiter.should_rate_limit(config, req("basic", d(("key2", "a")), d(("named", "a"), hits=1)))
    assert await store.get(["basic_key2_a_1699999980"]) == [0]
    decision = await limiter.should_rate_limit(config, req("basic", d(("key2", "a"))))
    assert decision.statuses[0].remaining == 19
    assert await store.get(["basic_key2_a_1699999980"]) == [1]


async def test_stop_increment_with_local_cache_increments_nothing(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, stop_cache_key_increment_when_overlimit=True, local_cache_size_in_bytes=4096)
    await limiter.should_rate_limit(config, req("basic", d(("zero", "a"))))
    store.calls.clear()
    decision = await limiter.should_rate_limit(config, req("basic", d(("zero", "a")), d(("key2", "a"))))
    assert decision.overall is Code.OVER_LIMIT
    # As the reference: no read, and the other key gets an increment of 0 (docs/compatibility.md).
    assert store.calls == [("increment", [Increment("basic_key2_a_1699999980", 0, 60, 60)])]
    assert await store.get(["basic_key2_a_1699999980"]) == [0]


async def test_jitter_added_to_ttl(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = Limiter(store=store, stats=stats, options=LimiterOptions(expiration_jitter_max_seconds=300), clock=clock, jitter=lambda n: n - 1)
    await limiter.should_rate_limit(config, req("basic", d(("key2", "a"))))
    assert store.calls[0][1][0].ttl == 60 + 299  # type: ignore[union-attr]


async def test_cache_key_prefix(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock, cache_key_prefix="prefix:")
    await limiter.should_rate_limit(config, req("basic", d(("key1", "foo"))))
    assert store.calls[0][1][0].key == "prefix:basic_key1_foo_1700000005"  # type: ignore[union-attr]


async def test_statuses_follow_request_order(config, store, stats, clock) -> None:  # type: ignore[no-untyped-def]
    limiter = make_limiter(store, stats, clock)
    decision = await limiter.should_rate_limit(
        config, req("basic", d(("nothing", "1")), d(("key3", "a")), d(("unlimited", "u")), d(("key1", "b")))
    )
    assert len(decision.statuses) == 4
    assert [s.rule.requests_per_unit if s.rule else None for s in decision.statuses] == [None, 10, None, 50]
