"""A config edit observed through Envoy: the service watches its config directory
(RUNTIME_WATCH_ROOT=false, the Kubernetes ConfigMap mode) and the next requests get the new limit.
"""

from __future__ import annotations

import time
from pathlib import Path

from .client import Reply, fresh_window, request
from .stacks import Stacks

RULES = """\
domain: mydomain
descriptors:
  - key: generic_key
    value: expensive
    rate_limit:
      unit: hour
      requests_per_unit: {limit}
"""
RELOAD_TIMEOUT = 15.0


def poll(port: int, path: str, until: str, timeout: float = RELOAD_TIMEOUT) -> Reply:
    """Request ``path`` until X-RateLimit-Limit is ``until``; the last reply."""
    deadline = time.monotonic() + timeout
    while True:
        reply = request(port, path)
        if reply.headers.get("x-ratelimit-limit") == until or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def test_edited_config_file_applies_through_envoy(stacks: Stacks, tmp_path: Path) -> None:
    config_dir = tmp_path / "runtime" / "config"
    config_dir.mkdir(parents=True)
    rules = config_dir / "rules.yaml"
    rules.write_text(RULES.format(limit=1))
    service = stacks.service(config_dir, env={"RUNTIME_WATCH_ROOT": "false"})
    envoy = stacks.envoy(service)
    # An hour-long window: the counter cannot reset while we wait for the reload.
    fresh_window(3600, need=RELOAD_TIMEOUT + 5)

    before = [request(envoy.port, "/expensive") for _ in range(2)]
    assert [r.status for r in before] == [200, 429]

    rules.write_text(RULES.format(limit=1000))
    after = poll(envoy.port, "/expensive", until="1000, 1000;w=3600")

    assert after.headers.get("x-ratelimit-limit") == "1000, 1000;w=3600", "no reload seen"
    assert after.status == 200
    # Same counter, new limit: the requests refused while polling were counted too.
    assert 0 < int(after.headers["x-ratelimit-remaining"]) < 998

    # A broken edit keeps the last good config.
    rules.write_text("domain: mydomain\ndescriptors: [{key: generic_key, bogus: 1}]\n")
    service.process.wait_for_log(r"Error loading new configuration: .*unknown key 'bogus'")
    assert request(envoy.port, "/expensive").headers["x-ratelimit-limit"] == "1000, 1000;w=3600"
