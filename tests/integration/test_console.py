"""The console's JSON on a running App's debug port (docs/console.md): every panel's shape, hostile
values escaped in every answer, the dry run counting nothing on a real Redis, load errors with
file and line, the backend panel of a Redis store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.clock import FakeClock
from support.redis_fixtures import RedisServer
from support.service_env import base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.config.source import FileSource
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.settings.model import Settings

HOSTILE = "<script>alert('x')</script>&<img src=x onerror=alert(1)>"
RULES = f"""
domain: web
descriptors:
  - key: user
    rate_limit: {{unit: minute, requests_per_unit: 3}}
  - key: path
    value: "{HOSTILE}"
    shadow_mode: true
    rate_limit: {{unit: hour, requests_per_unit: 1}}
  - key: team
    descriptors:
      - key: plan
        value: gold*
        rate_limit: {{unit: day, requests_per_unit: 100, name: gold}}
  - key: api
    rate_limit: {{unit: second, requests_per_unit: 10, algorithm: token_bucket, burst: 30}}
"""


class Running:
    def __init__(self, app: App, http: aiohttp.ClientSession, config_dir: Path) -> None:
        self.app = app
        self.http = http
        self.config_dir = config_dir
        self.redis: RedisServer | None = None

    async def raw(self, path: str) -> str:
        async with self.http.get(path) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "application/json"
            return await response.text()

    async def get(self, path: str) -> Any:
        return json.loads(await self.raw(path))

    async def dry_run(self, body: Any, status: int = 200) -> Any:
        async with self.http.post("/console/api/dry-run", json=body) as response:
            text = await response.text()
            assert response.status == status, text
            assert "<" not in text and ">" not in text
            return json.loads(text)

    async def ask(self, *entries: tuple[str, str]) -> None:
        request = Request("web", (RequestDescriptor(tuple(entries)),))
        await self.app.service.should_rate_limit(request)


@pytest.fixture
async def running(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Running]:
    runtime, config_dir = config_dir_env(tmp_path, RULES)
    async with App(Settings.from_env(base_env(**runtime)), clock=clock) as app:
        assert app.debug is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.debug.port}") as http:
            yield Running(app, http, config_dir)


async def test_rules_panel_is_the_tree_with_its_source(running: Running) -> None:
    rules = await running.get("/console/api/rules")
    (domain,) = rules["domains"]
    assert domain["domain"] == "web"
    user, path, team, api = domain["descriptors"]
    assert (api["rule"]["algorithm"], api["rule"]["burst"]) == ("token_bucket", 30)
    assert user["rule"] == {
        "name": "", "stats_key": "web.user", "requests_per_unit": 3, "unit": "MINUTE",
        "algorithm": "fixed_window", "unit_multiplier": 1, "burst": 0,
        "charge_only_when_admitted": False, "more_limits": [], "unlimited": False,
        "shadow_mode": False, "quota_mode": False, "detailed_metric": False, "replaces": [],
    }
    assert path["value"] == HOSTILE and path["rule"]["shadow_mode"]
    (plan,) = team["children"]
    assert plan["wildcard"] and plan["rule"]["name"] == "gold" and team["rule"] is None
    assert rules["source"]["type"] == "file"
    assert rules["source"]["directory"] == str(running.config_dir)
    assert [f["name"] for f in rules["source"]["files"]] == ["basic.yaml"]
    assert rules["source"]["files"][0]["mtime"] == pytest.approx((running.config_dir / "basic.yaml").stat().st_mtime)
    assert rules["loaded_at"] == running.app.clock() and rules["loads"] == 1
    assert rules["last_error"] is None


async def test_a_failed_reload_shows_file_and_line_and_keeps_the_old_rules(running: Running) -> None:
    (running.config_dir / "zz-broken.yaml").write_text("domain: other\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n")
    source = running.app.source
    assert isinstance(source, FileSource)
    await source.load(running.app)  # what the watcher does on a change
    rules = await running.get("/console/api/rules")
    error = rules["last_error"]
    assert error["file"] == "zz-broken.yaml" and error["line"] == 4
    assert "fortnight" in error["message"]
    assert rules["failures"] == 1 and [d["domain"] for d in rules["domains"]] == ["web"]


async def test_traffic_panel_rates_per_domain_and_rule(running: Running, clock: FakeClock) -> None:
    console = running.app.console
    assert console is not None
    console.traffic_history.sample()  # the baseline (the sampler task may have taken it already)
    clock.advance(1)
    console.traffic_history.sample()
    for _ in range(5):
        await running.ask(("user", "u1"))
    await running.ask(("path", HOSTILE))
    clock.advance(2)
    console.traffic_history.sample()
    raw = await running.raw("/console/api/traffic")
    assert "<" not in raw
    traffic = json.loads(raw)
    web = traffic["domains"]["web"]
    assert web["total_hits"][-1] == 3.0  # 6 requests in 2 s
    assert web["over_limit"][-1] == 1.0  # user's 4th and 5th of 3 allowed, in 2 s
    rules = {r["rule"]: r["rates"] for r in traffic["rules"]}
    assert rules["web.user"]["over_limit"][-1] == 1.0  # 2 of 5 over
    assert rules[f"web.path_{HOSTILE}"]["shadow_mode"][-1] == 0.0  # 1 of limit 1: not over yet


async def test_hot_keys_panel_lists_counters_over_and_near(running: Running) -> None:
    for _ in range(4):
        await running.ask(("user", HOSTILE))
    for _ in range(3):
        await running.ask(("user", "calm"))
    raw = await running.raw("/console/api/hot-keys")
    assert "<" not in raw and ">" not in raw
    keys = json.loads(raw)["keys"]
    assert [(k["descriptor"], k["count"], k["over"]) for k in keys] == [
        ([{"key": "user", "value": HOSTILE}], 4, True),
        ([{"key": "user", "value": "calm"}], 3, False),
    ]
    assert all(k["limit"] == 3 and k["rule"] == "web.user" and 0 < k["reset_seconds"] <= 60 for k in keys)


async def test_dry_run_explains_and_answers_without_counting(running: Running) -> None:
    for _ in range(2):
        await running.ask(("user", "u"))
    stats_before = running.app.stats.snapshot()
    body = {"domain": "web", "descriptors": [
        {"entries": [{"key": "user", "value": "u"}]},
        {"entries": [{"key": "team", "value": "t"}, {"key": "plan", "value": "gold-plus"}]},
        {"entries": [{"key": "team", "value": "t"}, {"key": "plan", "value": HOSTILE}]},
    ]}
    for _ in range(5):
        answer = await running.dry_run(body)
    assert running.app.stats.snapshot() == stats_before
    user, gold, hostile = answer["descriptors"]
    assert answer["overall_code"] == "OK" and answer["domain_known"]
    assert (user["code"], user["current"], user["remaining"], user["stats_key"]) == ("OK", 2, 1, "web.user")
    assert 0 < user["reset_seconds"] <= 60
    assert [(s["how"], s["node"]) for s in user["path"]] == [("key", "user")]
    assert [(s["how"], s["node"]) for s in gold["path"]] == [("key", "team"), ("wildcard", "plan_gold*")]
    assert gold["rule"]["name"] == "gold" and gold["current"] == 0 and gold["remaining"] == 100
    assert hostile["rule"] is None and hostile["path"][-1] == {"key": "plan", "value": HOSTILE, "how": "none", "node": "", "rule": None}
    assert hostile["entries"][1]["value"] == HOSTILE
    # Still two: the third real request is within the limit, the fourth over.
    await running.ask(("user", "u"))
    answer = await running.dry_run({"domain": "web", "descriptors": [body["descriptors"][0]]})
    assert answer["overall_code"] == "OK" and answer["descriptors"][0]["remaining"] == 0
    await running.ask(("user", "u"))
    answer = await running.dry_run({"domain": "web", "descriptors": [body["descriptors"][0]]})
    assert answer["overall_code"] == "OVER_LIMIT" and answer["descriptors"][0]["current"] == 4


async def test_dry_run_reads_fixed_windows_only_and_says_so(running: Running) -> None:
    """docs/console.md (Try a request): a rule of another algorithm is shown, not read."""
    answer = await running.dry_run({"domain": "web", "descriptors": [
        {"entries": [{"key": "api", "value": "x"}]}, {"entries": [{"key": "user", "value": "u"}]},
    ]})
    api, user = answer["descriptors"]
    assert api["code"] == "UNKNOWN" and api["current"] is None and api["rule"]["algorithm"] == "token_bucket"
    assert "token_bucket" in api["why"]
    assert user["code"] == "OK" and user["current"] == 0 and answer["overall_code"] == "OK"


async def test_dry_run_refuses_what_it_cannot_answer(running: Running) -> None:
    async with running.http.post("/console/api/dry-run", data="domain=web") as response:
        assert response.status == 415  # a cross-site form post cannot send JSON
    error = await running.dry_run({"domain": "", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}, 400)
    assert "domain" in error["error"]
    error = await running.dry_run({"domain": "web", "descriptors": [], "bogus": HOSTILE}, 400)
    assert "bogus" in error["error"]
    async with running.http.post("/console/api/dry-run", data=b"{" * 100, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
    unknown = await running.dry_run({"domain": HOSTILE, "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]})
    assert unknown["domain"] == HOSTILE and not unknown["domain_known"]
    assert unknown["descriptors"][0]["rule"] is None and unknown["overall_code"] == "OK"


async def test_page_is_served_self_contained_with_its_policy(running: Running) -> None:
    async with running.http.get("/console") as response:
        assert response.status == 200 and response.content_type == "text/html"
        html = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert 'id="rules-tree"' in html and 'id="dry-run"' in html
    async with running.http.get("/") as response:
        assert "/console: " in await response.text()


@pytest.fixture
async def redis_app(tmp_path: Path, redis_server_factory: Any) -> AsyncIterator[Running]:
    redis = redis_server_factory(requirepass="console-s3cret")
    runtime, config_dir = config_dir_env(tmp_path, RULES)
    env = base_env(**runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis.url,
                   REDIS_AUTH="console-s3cret")
    async with App(Settings.from_env(env)) as app:
        assert app.debug is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.debug.port}") as http:
            running = Running(app, http, config_dir)
            running.redis = redis
            yield running


async def test_backend_panel_on_redis_and_a_dry_run_that_writes_nothing(redis_app: Running) -> None:
    for _ in range(4):
        await redis_app.ask(("user", "r"))
    client = redis_app.redis.client()
    keys = sorted(client.keys("*"))
    values = [client.get(k) for k in keys]
    ttls = [client.ttl(k) for k in keys]
    answer = await redis_app.dry_run({"domain": "web", "descriptors": [{"entries": [{"key": "user", "value": "r"}]}, {"entries": [{"key": "user", "value": "new"}]}]})
    assert [d["current"] for d in answer["descriptors"]] == [4, 0]
    assert answer["overall_code"] == "OVER_LIMIT"
    assert sorted(client.keys("*")) == keys and [client.get(k) for k in keys] == values
    assert all(after <= before for after, before in zip([client.ttl(k) for k in keys], ttls, strict=True))
    raw = await redis_app.raw("/console/api/backend")
    assert "s3cret" not in raw
    backend = json.loads(raw)
    assert (backend["type"], backend["detail"], backend["healthy"]) == ("redis", "single", True)
    (primary,) = backend["processes"]
    assert primary["role"] == "primary" and primary["backend_reachable"]
    assert primary["breaker"]["state"] == "closed" and primary["breaker"]["max_in_flight"] == 1000
    assert primary["pool"]["cx_active"] >= 1
    increment, get = primary["operations"]["increment"], primary["operations"]["get"]
    assert increment["calls"] == 4 and increment["errors"] == 0 and increment["p50_ms"] > 0
    assert increment["p99_ms"] >= increment["p50_ms"]
    assert get["calls"] == 1  # the dry run read its two counters in one round trip
    for path in ("/console/api/rules", "/console/api/hot-keys", "/console/api/traffic"):
        assert "s3cret" not in await redis_app.raw(path)


async def test_dry_run_without_any_config_is_unavailable() -> None:
    async with App(Settings.from_env(base_env(RUNTIME_SUBDIRECTORY=""))) as app:  # no rules at all
        assert app.debug is not None
        async with aiohttp.ClientSession(f"http://127.0.0.1:{app.debug.port}") as http:
            body = {"domain": "web", "descriptors": [{"entries": [{"key": "user", "value": "u"}]}]}
            async with http.post("/console/api/dry-run", json=body) as response:
                assert response.status == 503
                assert (await response.json())["error"] == "no rate limit configuration loaded"
            async with http.get("/console/api/rules") as response:
                rules = await response.json()
    assert rules["domains"] == [] and rules["loaded_at"] is None
