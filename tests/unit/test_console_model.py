"""The console's pieces without sockets (docs/console.md): hot keys, the backend latency record,
traffic rates, the dry run, the match explanation, load errors, JSON escaping and the page."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import FakeClock
from support.stores import OpenMemoryStore

from ratelimit_svc.backends.latency import BOUNDS_MS, LatencyRecorder, TimedStore
from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.status import ConfigStatus, load_error
from ratelimit_svc.errors import BackendError
from ratelimit_svc.limiter.hotkeys import HotKey, HotKeys
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.limiter.localcache import LocalCache
from ratelimit_svc.limiter.matching import explain, match
from ratelimit_svc.limiter.store import Increment
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.servers.console.model import dumps, node_json
from ratelimit_svc.servers.console.page import console_page
from ratelimit_svc.servers.console.traffic import TrafficHistory, domain_of
from ratelimit_svc.stats.registry import MemoryStats

RULES = """
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 2}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3}
  - key: path
    value: /api/*
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: path
    rate_limit: {unit: day, requests_per_unit: 1000}
  - key: free
    rate_limit: {unlimited: true}
  - key: team
    descriptors:
      - key: plan
        value: gold
        rate_limit: {unit: minute, requests_per_unit: 9}
"""


def shop_config() -> object:
    return load_config([ConfigFile("shop.yaml", RULES)])


# -- hot keys ------------------------------------------------------------------------------------


def test_hot_keys_stay_bounded_under_a_flood_of_distinct_values() -> None:
    hot = HotKeys(capacity=10, max_value_chars=32)
    for n in range(10_000):
        value = f"<script>{n}</script>" + "x" * 1000
        hot.record(f"k_{value}_60", "shop", [("user", value)], "shop.user", 5 + n % 7, 5, 160, 100)
    assert len(hot) <= 20
    top = hot.top(100)
    assert len(top) == 10
    assert all(len(k.entries[0][1]) <= 32 for k in top)
    # The ten hottest are those furthest over (count 11 of limit 5).
    assert {k.count for k in top} == {11}


def test_hot_keys_keep_the_highest_count_and_drop_ended_windows() -> None:
    hot = HotKeys(capacity=5)
    hot.record("a", "d", [("k", "a")], "d.k", 9, 10, 160, 100)
    hot.record("a", "d", [("k", "a")], "d.k", 12, 10, 160, 101)
    hot.record("a", "d", [("k", "a")], "d.k", 11, 10, 160, 102)
    hot.record("b", "d", [("k", "b")], "d.k", 9, 10, 105, 100)
    assert [(k.key, k.count) for k in hot.top(103)] == [("a", 12), ("b", 9)]
    assert [k.key for k in hot.top(105)] == ["a"]  # b's window ended at 105
    shown = hot.top(103)[0].as_dict(103)
    assert shown == {
        "key": "a", "domain": "d", "descriptor": [{"key": "k", "value": "a"}], "rule": "d.k",
        "count": 12, "limit": 10, "over": True, "reset_seconds": 57,
    }
    assert HotKey.from_dict(shown, 103) == hot.top(103)[0]


def test_hot_keys_merge_takes_the_higher_count_of_two_processes() -> None:
    mine, theirs = HotKeys(), HotKeys()
    mine.record("a", "d", [("k", "a")], "d.k", 9, 10, 160, 100)
    theirs.record("a", "d", [("k", "a")], "d.k", 14, 10, 160, 100)
    theirs.record("b", "d", [("k", "b")], "d.k", 10, 10, 160, 100)
    mine.merge(theirs.top(100), 100)
    assert [(k.key, k.count) for k in mine.top(100)] == [("a", 14), ("b", 10)]


async def test_limiter_tells_hot_keys_of_counters_past_the_near_threshold(clock: FakeClock) -> None:
    hot = HotKeys()
    limiter = Limiter(MemoryStore(clock), MemoryStats(), LimiterOptions(), clock, hot_keys=hot)
    config = shop_config()
    request = Request("shop", (RequestDescriptor((("user", "<b>eve</b>"),)),))
    for _ in range(4):  # 5 per minute: near-limit is a count above 4
        await limiter.should_rate_limit(config, request)  # type: ignore[arg-type]
    assert hot.top(clock()) == []
    for _ in range(2):
        await limiter.should_rate_limit(config, request)  # type: ignore[arg-type]
    top = hot.top(clock())
    assert len(top) == 1 and top[0].count == 6 and top[0].limit == 5
    assert top[0].entries == (("user", "<b>eve</b>"),)
    assert top[0].stats_key == "shop.user"
    assert top[0].reset_at == (int(clock()) // 60 + 1) * 60


# -- backend latency -------------------------------------------------------------------------------


def test_latency_quantiles_are_within_one_bucket() -> None:
    now = FakeClock(1000.0)
    recorder = LatencyRecorder(now)
    for n in range(1, 101):
        recorder.record("increment", float(n))  # 1..100 ms
    summary = recorder.summary()["increment"]
    assert summary["calls"] == 100 and summary["errors"] == 0
    p50, p99 = summary["p50_ms"], summary["p99_ms"]
    assert isinstance(p50, float) and isinstance(p99, float)
    assert 50 <= p50 <= 50 * 1.2 + 0.01
    assert 99 <= p99 <= 99 * 1.2 + 0.01
    assert recorder.summary()["get"] == {"calls": 0, "errors": 0, "p50_ms": None, "p99_ms": None}


def test_latency_keeps_only_the_last_minute_in_bounded_slots() -> None:
    now = FakeClock(1000.0)
    recorder = LatencyRecorder(now)
    recorder.record("get", 500.0, error=True)
    for _ in range(600):  # ten minutes, a call per second
        now.advance(1)
        recorder.record("get", 1.0)
    summary = recorder.summary()["get"]
    assert summary["errors"] == 0  # the slow failure is long gone
    assert 55 <= summary["calls"] <= 60  # the last minute only (5 s slots)
    assert summary["p99_ms"] is not None and summary["p99_ms"] <= 1.2
    assert len(recorder._slots) <= 12


async def test_timed_store_records_calls_and_backend_errors() -> None:
    class Failing(OpenMemoryStore):
        async def get(self, keys: Sequence[str]) -> list[int]:
            raise BackendError("down")

    recorder = LatencyRecorder()
    store = TimedStore(Failing(), recorder)
    assert await store.increment([Increment("k", 2, 60, 60)]) == [2]
    with pytest.raises(BackendError):
        await store.get(["k"])
    summary = recorder.summary()
    assert summary["increment"]["calls"] == 1 and summary["increment"]["errors"] == 0
    assert summary["get"]["calls"] == 1 and summary["get"]["errors"] == 1
    assert BOUNDS_MS[0] < 0.02 and BOUNDS_MS[-1] > 30_000


# -- traffic -------------------------------------------------------------------------------------


async def test_traffic_rates_per_domain_and_rule(clock: FakeClock) -> None:
    stats = MemoryStats()
    limiter = Limiter(MemoryStore(clock), stats, LimiterOptions(), clock)
    config = shop_config()
    history = TrafficHistory(stats, domains=lambda: ["shop"], interval=2.0, clock=clock)
    assert history.sample() is None  # nothing to take a rate against yet
    for _ in range(8):
        request = Request("shop", (RequestDescriptor((("user", "u"),)),))
        await limiter.should_rate_limit(config, request)  # type: ignore[arg-type]
    await limiter.should_rate_limit(config, Request("shop", (RequestDescriptor((("path", "/api/x"),)),)))  # type: ignore[arg-type]
    clock.advance(2)
    history.sample()
    clock.advance(2)
    history.sample()  # an idle interval
    data = history.as_json()
    assert data["series"] == ["total_hits", "within_limit", "near_limit", "over_limit", "shadow_mode"]
    assert len(data["times"]) == 2  # type: ignore[arg-type]
    shop = data["domains"]["shop"]  # type: ignore[index]
    # 9 requests in 2 s; user: 5 within (near from the 5th), 3 over.
    assert shop["total_hits"] == [4.5, 0.0]
    assert shop["over_limit"] == [1.5, 0.0]
    rules = {r["rule"]: r["rates"] for r in data["rules"]}  # type: ignore[attr-defined]
    assert set(rules) == {"shop.user", "shop.path_/api/*"}
    assert rules["shop.user"]["within_limit"] == [2.5, 0.0]
    assert rules["shop.path_/api/*"]["total_hits"] == [0.5, 0.0]
    json.loads(dumps(data))


def test_traffic_memory_is_bounded_by_samples_and_rules(clock: FakeClock) -> None:
    stats = MemoryStats(max_keys=100_000)
    history = TrafficHistory(stats, interval=1.0, samples=30, max_rules=5, clock=clock)
    for tick in range(100):
        for n in range(50):  # 50 distinct keys, each busier than the last
            stats.add(f"ratelimit.service.rate_limit.d.k_{n}.total_hits", n + 1)
        clock.advance(1)
        history.sample()
        assert len(history.samples) == min(tick, 30)  # the first sample only sets the baseline
    assert all(len(s.rules) == 5 for s in history.samples)
    assert set(history.samples[-1].rules) == {f"d.k_{n}" for n in range(45, 50)}
    assert len(history.as_json(max_rules=3)["rules"]) == 3  # type: ignore[arg-type]


def test_domain_of_prefers_the_longest_loaded_domain() -> None:
    assert domain_of("a.b.key_v", ["a", "a.b"]) == "a.b"
    assert domain_of("other.key", ["a"]) == "other"


# -- dry run and the explanation --------------------------------------------------------------------


async def test_dry_run_counts_nothing_and_answers_as_a_real_request(clock: FakeClock) -> None:
    stats = MemoryStats()
    store = MemoryStore(clock)
    cache = LocalCache(1 << 20)
    limiter = Limiter(store, stats, LimiterOptions(), clock, local_cache=cache)
    config = shop_config()
    user = RequestDescriptor((("user", "<script>x</script>"),))
    login = RequestDescriptor((("path", "/login"), ("user", "u")))
    free = RequestDescriptor((("free", "1"),))
    for _ in range(5):
        await limiter.should_rate_limit(config, Request("shop", (user,)))  # type: ignore[arg-type]
    before_stats = stats.snapshot()
    before_cache = (cache.hit_count, cache.miss_count)
    request = Request("shop", (user, login, free, RequestDescriptor((("nope", "1"),))))
    for _ in range(3):
        decision, matches, current = await limiter.dry_run(config, request)  # type: ignore[arg-type]
    assert stats.snapshot() == before_stats
    assert (cache.hit_count, cache.miss_count) == before_cache
    assert current == [5, 0, None, None]
    assert [s.code for s in decision.statuses] == [Code.OK, Code.OK, Code.OK, Code.OK]
    assert [s.remaining for s in decision.statuses][:2] == [0, 3]  # 5 of 5 used; 0 of 3
    assert decision.statuses[2].remaining == 2**32 - 1  # unlimited
    assert decision.overall is Code.OK
    assert matches[3] is None
    # The real request agrees: the sixth is over, and it is counted once.
    real = await limiter.should_rate_limit(config, Request("shop", (user,)))  # type: ignore[arg-type]
    assert real.overall is Code.OVER_LIMIT
    decision, _, current = await limiter.dry_run(config, Request("shop", (user,)))  # type: ignore[arg-type]
    assert current == [6] and decision.overall is Code.OVER_LIMIT


def test_explain_walks_the_tree_level_by_level() -> None:
    config = shop_config()
    steps = explain(config, "shop", [("path", "/login"), ("user", "u")])  # type: ignore[arg-type]
    assert [(s.how, s.node) for s in steps] == [("exact", "path_/login"), ("key", "user")]
    assert steps[-1].rule is not None and steps[-1].rule.requests_per_unit == 3
    steps = explain(config, "shop", [("path", "/api/v1")])  # type: ignore[arg-type]
    assert [(s.how, s.node) for s in steps] == [("wildcard", "path_/api/*")]
    steps = explain(config, "shop", [("team", "t"), ("plan", "silver")])  # type: ignore[arg-type]
    assert [s.how for s in steps] == ["key", "none"]
    steps = explain(config, "shop", [("user", "u"), ("extra", "1")])  # type: ignore[arg-type]
    assert [s.how for s in steps] == ["key", "none"]  # user has no children: no match
    assert explain(config, "other", [("user", "u")]) == []  # type: ignore[arg-type]


_KEYS = st.sampled_from(["user", "path", "free", "team", "plan", "x"])
_VALUES = st.sampled_from(["", "u", "/login", "/api/v1", "/api/", "gold", "silver", "1"])


_SHOP = shop_config()


@settings(deadline=None)  # a loaded CI machine must not turn slowness into a failure
@given(st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=4))
def test_explain_ends_where_match_does(entries: list[tuple[str, str]]) -> None:
    config = _SHOP
    found = match(config, "shop", entries)  # type: ignore[arg-type]
    steps = explain(config, "shop", entries)  # type: ignore[arg-type]
    ended = steps[-1].rule if steps and steps[-1].how != "none" and len(steps) == len(entries) else None
    assert (found.rule if found is not None else None) is ended


def test_rule_tree_json_lists_each_node_once_with_its_marks() -> None:
    config = shop_config()
    root = config.domains["shop"]  # type: ignore[attr-defined]
    tree = node_json(root)["children"]
    assert [(n["key"], n["value"]) for n in tree] == [
        ("user", ""), ("path", "/login"), ("path", "/api/*"), ("path", ""), ("free", ""), ("team", ""),
    ]  # config order, the wildcard once
    api = tree[2]
    assert api["wildcard"] and api["rule"]["shadow_mode"] and api["rule"]["unit"] == "SECOND"
    assert tree[4]["rule"]["unlimited"]
    assert tree[1]["children"][0]["rule"]["requests_per_unit"] == 3


# -- load status, escaping, the page -----------------------------------------------------------------


def test_load_error_names_file_and_line() -> None:
    error = load_error("team/a.yaml: error loading config file: bad unit (line 7, descriptors[0])", 5.0)
    assert (error.file, error.line, error.at) == ("team/a.yaml", 7, 5.0)
    assert load_error("no file here", 1.0).line is None
    status = ConfigStatus(clock=lambda: 42.0)
    status.failed("x.yaml: oops (line 3)")
    status.loaded(version="v7", nonce="n1")
    assert (status.loads, status.failures, status.loaded_at, status.xds_version) == (1, 1, 42.0, "v7")
    assert status.last_error is not None and status.last_error.line == 3


def test_json_escapes_markup_and_round_trips() -> None:
    hostile = {"value": "</script><script>alert('x')</script>&<img src=x onerror=alert(1)>"}
    text = dumps(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == hostile


def test_page_has_no_external_assets_no_markup_sinks_and_a_matching_csp() -> None:
    page = console_page()
    html = page.html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "innerHTML" not in html and "outerHTML" not in html and "insertAdjacentHTML" not in html
    assert "document.write" not in html and "eval(" not in html
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    policy = page.headers["Content-Security-Policy"]
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
