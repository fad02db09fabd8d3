"""docs/algorithms.md through the real Envoy, on Redis: a token-bucket rule and a two-limit rule
behind the demo's routes, with the IETF RateLimit headers next to Envoy's own.

The service gets rules of this test's own for the demo's domain (envoy/envoy.tmpl.yaml): the
``/expensive`` route's descriptor is a token bucket, the ``/static/`` route's carries two limits.
Both are chosen so that no window or refill lands inside the test (a refill every 10 minutes, a
sliding hour), whatever the machine's speed.
"""

from __future__ import annotations

from pathlib import Path

from support.redis_fixtures import RedisServer

from .client import request
from .stacks import Stacks

RULES = """\
domain: mydomain
descriptors:
  - key: generic_key
    value: expensive
    rate_limit: {unit: hour, requests_per_unit: 6, algorithm: token_bucket, burst: 2}
  - key: generic_key
    value: static
    rate_limit:
      - {unit: minute, requests_per_unit: 5}
      - {unit: hour, requests_per_unit: 2, algorithm: sliding_window}
"""


def _config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "algorithms-rules"
    directory.mkdir()
    (directory / "rules.yaml").write_text(RULES)
    return directory


def test_token_bucket_and_two_limits_through_envoy(
    stacks: Stacks, tmp_path: Path, redis_db: RedisServer
) -> None:
    service = stacks.service(
        _config_dir(tmp_path),
        redis_url=redis_db.url,
        env={"IETF_RATELIMIT_HEADERS_ENABLED": "true"},
    )
    envoy = stacks.envoy(service)

    # Token bucket: a burst of 2, then one token per 10 minutes.
    bucket = [request(envoy.port, "/expensive") for _ in range(4)]
    assert [r.status for r in bucket] == [200, 200, 429, 429]
    assert bucket[2].limited
    assert bucket[2].headers["ratelimit-policy"] == '"mydomain.generic_key_expensive";q=2;w=1200'  # refilled in 2 x 10 min
    assert bucket[2].headers["ratelimit"].startswith('"mydomain.generic_key_expensive";r=0;t=')
    assert 0 < int(bucket[2].headers["ratelimit"].rpartition("t=")[2]) <= 600
    assert redis_db.client().exists("tb:{mydomain_generic_key_expensive_}3600") == 1

    # Two limits: 5 per minute and 2 per (sliding) hour; the hour decides the third request.
    two = [request(envoy.port, "/static/a.css") for _ in range(3)]
    assert [r.status for r in two] == [200, 200, 429]
    assert two[2].headers["ratelimit-policy"] == (
        '"mydomain.generic_key_static.per_hour_sliding_window";q=2;w=3600'
    )
    assert two[2].headers["x-ratelimit-limit"].startswith("2, ")
    client = redis_db.client()
    assert client.exists("sw:{mydomain_generic_key_static_}3600") == 1
    minute_keys = client.keys("fw:{mydomain_generic_key_static_}60:*")
    assert len(minute_keys) in (1, 2)  # 2 if a minute boundary passed between the requests
    assert sum(int(client.get(k) or 0) for k in minute_keys) == 3  # a fixed window counts all
