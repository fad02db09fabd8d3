"""Every route of the demo's Envoy config, asserted with real HTTP through Envoy.

Envoy renders envoy/envoy.tmpl.yaml, asks the service (rules: config/example.yaml) and answers
429 with ``x-envoy-ratelimited`` when the service says OVER_LIMIT. Per-minute rules keep counts
exact (``fresh_window`` avoids a reset in the middle of a burst); the seed's 2-per-second rule is
checked at the start of a second.
"""

from __future__ import annotations

import time
import uuid

import pytest

from .client import Reply, client_id, fnv1a32, fresh_window
from .stacks import EnvoyStack


def token(name: str) -> str:
    """A bearer token of this test only: per-client counters start at zero."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


def statuses(replies: list[Reply]) -> list[int]:
    return [r.status for r in replies]


def burst(stack: EnvoyStack, path: str, count: int, **kwargs: object) -> list[Reply]:
    return [stack.get(path, **kwargs) for _ in range(count)]


def seconds_to_next_minute() -> int:
    return 60 - int(time.time()) % 60


# -- identity (envoy/identity.lua) -------------------------------------------------------------


def test_identity_headers_are_derived_from_the_bearer_token(envoy_stack: EnvoyStack) -> None:
    alice = envoy_stack.get("/", token="alice").json()
    assert alice["client"] == f"client-{fnv1a32('alice')}" == "client-872213e7"
    assert alice["plan"] == "free"
    assert (
        envoy_stack.get("/", headers={"authorization": "bearer alice"}).json()["client"]
        == (alice["client"])
    )
    premium = envoy_stack.get("/", token="premium-acme").json()
    assert (premium["client"], premium["plan"]) == (client_id("premium-acme"), "premium")
    anonymous = envoy_stack.get("/", headers={"authorization": "Basic YTpi"}).json()
    assert (anonymous["client"], anonymous["plan"]) == ("anonymous", "free")
    # A client cannot pick someone else's bucket or plan by sending the headers itself.
    spoofed = envoy_stack.get(
        "/",
        token="mallory",
        headers={"x-ext-auth-ratelimit": alice["client"], "x-ext-auth-plan": "premium"},
    ).json()
    assert (spoofed["client"], spoofed["plan"]) == (client_id("mallory"), "free")


# -- the seed's descriptors: ratelimitkey (client) -> path, 2 per second -----------------------


def test_seed_route_limits_each_client_and_path_to_two_per_second(envoy_stack: EnvoyStack) -> None:
    alice, bob = token("alice"), token("bob")
    fresh_window(1, need=0.8)
    first = burst(envoy_stack, "/api/items", 3, token=alice)
    other_path = envoy_stack.get("/api/orders", token=alice)
    other_client = envoy_stack.get("/api/items", token=bob)

    assert statuses(first) == [200, 200, 429]
    assert first[2].limited and first[2].body == b""
    assert "x-envoy-ratelimited" not in first[0].headers
    assert other_path.status == 200 and other_client.status == 200
    # Envoy's X-RateLimit-* from the statuses: the tightest limit first, then every policy
    # (ratelimitkey/path 2 per 1s and database=default 500 per 1s).
    assert [r.headers["x-ratelimit-limit"] for r in first] == ["2, 2;w=1, 500;w=1"] * 3
    assert [r.headers["x-ratelimit-remaining"] for r in first] == ["1", "0", "0"]
    assert {r.headers["x-ratelimit-reset"] for r in first} == {"1"}


def test_two_bearer_tokens_are_counted_separately(envoy_stack: EnvoyStack) -> None:
    alice, bob = token("alice"), token("bob")
    fresh_window(60, need=5)
    alice_replies = burst(envoy_stack, "/orders", 3, token=alice)
    bob_replies = burst(envoy_stack, "/orders", 3, token=bob)
    anonymous = burst(envoy_stack, "/orders", 3)

    assert statuses(alice_replies) == statuses(bob_replies) == [200, 200, 429]
    assert alice_replies[2].limited and bob_replies[2].limited
    assert statuses(anonymous) == [200, 200, 429]  # no token: one shared "anonymous" bucket
    assert alice_replies[0].json()["client"] == client_id(alice)


# -- X-RateLimit-* (Envoy) and RateLimit-* (the service) ---------------------------------------


def test_envoy_builds_x_ratelimit_headers_from_the_statuses(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    replies = burst(envoy_stack, "/ip", 4, source="127.0.0.6")
    reset = seconds_to_next_minute()

    assert statuses(replies) == [200, 200, 200, 429]
    # DRAFT_VERSION_03: the limit, then the quota policy of each status (here one: 3 per 60s).
    assert [r.headers["x-ratelimit-limit"] for r in replies] == ["3, 3;w=60"] * 4
    assert [r.headers["x-ratelimit-remaining"] for r in replies] == ["2", "1", "0", "0"]
    for reply in replies:
        assert abs(int(reply.headers["x-ratelimit-reset"]) - reset) <= 1


def test_service_ratelimit_headers_when_enabled(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    replies = burst(envoy_stack, "/ip", 4, source="127.0.0.5")
    reset = seconds_to_next_minute()

    assert statuses(replies) == [200, 200, 200, 429]
    assert [r.headers["ratelimit-limit"] for r in replies] == ["3"] * 4
    assert [r.headers["ratelimit-remaining"] for r in replies] == ["2", "1", "0", "0"]
    for reply in replies:
        assert abs(int(reply.headers["ratelimit-reset"]) - reset) <= 1
        # The service's choice of status agrees with Envoy's.
        assert reply.headers["ratelimit-remaining"] == reply.headers["x-ratelimit-remaining"]
    # No descriptor, no call to the service, no headers of either kind.
    plain = envoy_stack.get("/")
    assert plain.status == 200
    assert not {"ratelimit-limit", "x-ratelimit-limit"} & plain.headers.keys()


# -- the other actions and rule kinds ----------------------------------------------------------


def test_header_value_match_limits_only_matching_requests(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    csv = burst(envoy_stack, "/reports", 3, headers={"accept": "text/csv"})
    json_ = burst(envoy_stack, "/reports", 5, headers={"accept": "application/json"})

    assert statuses(csv) == [200, 200, 429] and csv[2].limited
    assert csv[0].headers["x-ratelimit-limit"] == "2, 2;w=60"
    assert statuses(json_) == [200] * 5
    assert "x-ratelimit-limit" not in json_[0].headers  # no descriptor: the service is not asked


def test_generic_key_is_one_pool_for_all_clients(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    replies = [
        envoy_stack.get("/expensive", token=name) for name in ("alice", "bob", "carol", "dave")
    ]
    assert statuses(replies) == [200, 200, 200, 429]
    assert replies[3].limited


def test_remote_address_counts_per_client_ip(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    first_ip = burst(envoy_stack, "/ip", 4, source="127.0.0.2")
    # The address is the connection's peer (use_remote_address): X-Forwarded-For is not trusted.
    spoofed = envoy_stack.get("/ip", source="127.0.0.2", headers={"x-forwarded-for": "127.0.0.9"})
    second_ip = burst(envoy_stack, "/ip", 3, source="127.0.0.3")

    assert statuses(first_ip) == [200, 200, 200, 429] and first_ip[3].limited
    assert spoofed.limited
    assert statuses(second_ip) == [200, 200, 200]


def test_shadow_mode_rule_reports_but_never_limits(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    replies = burst(envoy_stack, "/shadow", 5)

    assert statuses(replies) == [200] * 5
    assert not any("x-envoy-ratelimited" in r.headers for r in replies)
    # Counted all the same: the statuses say the 1-per-minute rule is used up.
    assert [r.headers["x-ratelimit-remaining"] for r in replies] == ["0"] * 5
    assert replies[0].headers["x-ratelimit-limit"] == "1, 1;w=60"


def test_premium_rule_replaces_the_per_client_rule(envoy_stack: EnvoyStack) -> None:
    premium, free = token("premium"), token("free")
    fresh_window(60, need=5)
    premium_replies = burst(envoy_stack, "/orders", 6, token=premium)
    free_replies = burst(envoy_stack, "/orders", 3, token=free)

    assert statuses(premium_replies) == [200] * 5 + [429]
    assert premium_replies[0].headers["x-ratelimit-limit"] == '5, 5;w=60;name="premium"'
    assert statuses(free_replies) == [200, 200, 429]
    assert free_replies[0].headers["x-ratelimit-limit"] == '2, 2;w=60;name="per_client"'


def test_quota_mode_passes_while_either_service_has_quota(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    replies = burst(envoy_stack, "/quota", 5)

    # service_a allows 2 and service_b 3 per minute: the third request passes on service_b's
    # quota although service_a's is used up; the fourth finds both used up.
    assert statuses(replies) == [200, 200, 200, 429, 429]
    assert replies[2].headers["x-ratelimit-remaining"] == "0"  # service_a's status, over quota
    assert replies[3].limited


def test_unlimited_rule_never_limits_and_sends_no_limit_headers(envoy_stack: EnvoyStack) -> None:
    ok = "cluster.upstream.ratelimit.ok"
    before = envoy_stack.envoy.stats(ok).get(ok, 0)
    replies = burst(envoy_stack, "/static/logo.png", 20)

    assert statuses(replies) == [200] * 20
    assert not {"x-ratelimit-limit", "ratelimit-limit"} & replies[-1].headers.keys()
    # Every one of them was answered by the service (OK), not skipped by Envoy.
    assert envoy_stack.envoy.stats(ok)[ok] - before == 20


def test_limited_grpc_calls_end_with_resource_exhausted(envoy_stack: EnvoyStack) -> None:
    fresh_window(60, need=5)
    grpc_headers = {"content-type": "application/grpc", "te": "trailers"}
    replies = [
        envoy_stack.get("/ip", method="POST", headers=grpc_headers, source="127.0.0.4")
        for _ in range(4)
    ]
    limited = replies[3]
    # A gRPC error is HTTP 200 with grpc-status; rate_limited_as_resource_exhausted makes it 8
    # (RESOURCE_EXHAUSTED) instead of 14 (UNAVAILABLE).
    assert [r.headers.get("grpc-status") for r in replies[:3]] == [None] * 3
    assert (limited.status, limited.headers["grpc-status"]) == (200, "8")
    assert limited.headers["x-envoy-ratelimited"] == "true"


def test_counters_live_in_redis_under_the_reference_keys(envoy_stack: EnvoyStack) -> None:
    if envoy_stack.redis is None:
        pytest.skip("RATELIMIT_E2E_BACKEND=memory")
    alice = token("alice")
    fresh_window(60, need=5)
    assert statuses(burst(envoy_stack, "/orders", 2, token=alice)) == [200, 200]
    window = int(time.time()) // 60 * 60
    with envoy_stack.redis.client() as redis:
        assert redis.get(f"mydomain_client_id_{client_id(alice)}_{window}") == b"2"
