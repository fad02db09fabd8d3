"""What Envoy does when the rate-limit service is down: fail open by default (the demo's
``failure_mode_deny: false``), 500 with ``failure_mode_deny: true``.

Each test starts its own service and Envoy, checks that Envoy consults the service while it is up,
then stops the service (SIGTERM, as an orchestrator would) and asks again.
"""

from __future__ import annotations

from .client import request
from .stacks import Stacks

RATELIMIT_STATS = "cluster.upstream.ratelimit."


def test_fail_open_when_the_service_is_down(stacks: Stacks) -> None:
    service = stacks.service()
    envoy = stacks.envoy(service, failure_mode_deny=False)
    up = request(envoy.port, "/orders", token="alice")
    assert up.status == 200 and up.headers["x-ratelimit-limit"].startswith("2, ")

    assert service.process.stop() == 0
    replies = [request(envoy.port, "/orders", token="alice") for _ in range(3)]

    # Past the 2-per-minute limit, yet allowed: nobody could say otherwise.
    assert [r.status for r in replies] == [200, 200, 200]
    assert not {"x-ratelimit-limit", "x-envoy-ratelimited"} & replies[-1].headers.keys()
    stats = envoy.stats(RATELIMIT_STATS)
    assert stats[RATELIMIT_STATS + "error"] == 3
    assert stats[RATELIMIT_STATS + "failure_mode_allowed"] == 3


def test_fail_closed_with_failure_mode_deny(stacks: Stacks) -> None:
    service = stacks.service()
    envoy = stacks.envoy(service, failure_mode_deny=True)
    up = request(envoy.port, "/orders", token="alice")
    assert up.status == 200 and up.headers["x-ratelimit-limit"].startswith("2, ")

    assert service.process.stop() == 0
    denied = request(envoy.port, "/orders", token="alice")
    unlimited_route = request(envoy.port, "/", token="alice")

    assert denied.status == 500
    assert "x-envoy-ratelimited" not in denied.headers  # an error, not a limit
    # A route without rate_limits never asks the service, so it keeps working.
    assert unlimited_route.status == 200
    stats = envoy.stats(RATELIMIT_STATS)
    assert stats[RATELIMIT_STATS + "error"] == 1
    assert stats.get(RATELIMIT_STATS + "failure_mode_allowed", 0) == 0
