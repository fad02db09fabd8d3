"""The observability kit against a live service (docs/observability.md): every metric that the
Grafana dashboard and the Prometheus alert rules under deploy/observability/ query is one the
running service exports, with real HELP text; the build-info and process metrics are there.

The metric names are parsed out of the PromQL in the dashboard JSON and the rules YAML, so a panel
or alert added later is checked too. The service runs as a real process on a real Redis, which is
killed halfway so that the backend-error and circuit-breaker metrics exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from support.redis_fixtures import RedisServer, free_port
from support.service_env import ServiceProcess, base_env, config_dir_env

from ratelimit_svc import __version__
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "deploy" / "observability"
DASHBOARD = KIT / "grafana-dashboard.json"
ALERTS = KIT / "alerts.yaml"
# Series Prometheus makes itself, not the service.
PROMETHEUS_OWN = frozenset({"up", "scrape_duration_seconds"})

_KEYWORDS = frozenset(
    "by without on ignoring group_left group_right bool and or unless offset inf nan".split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out)."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = _CLAUSE.sub(" ", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        name, call = match[1], match[2]
        if call or name in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]?", name):
            continue
        names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):  # label_values(<metric>, <label>)
            exprs.append(re.sub(r"label_values\((\w+),.*\)", r"\1", query["query"]))
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_promql_parser_finds_metric_names_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_seconds_bucket{job=~"$job",x="by"}'
        "[$__rate_interval]))) > 0.05 and on (job) max_over_time(b_total[5m] offset 1h) "
        "/ clamp_min(c, 1e-9) or vector(0)"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "c"}


def test_dashboard_and_alerts_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"  # importable into any Grafana
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("over limit", "near limit", "latency", "error", "breaker", "config"):
        assert topic in titles, topic
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"RateLimitBackendErrors", "RateLimitBreakerOpen", "RateLimitConfigLoadFailing",
            "RateLimitHighLatency"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


RULES = """
domain: obs
descriptors:
  - key: user
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: trial
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
"""


def request(key: str, value: str) -> rls_pb2.RateLimitRequest:
    descriptor = ratelimit_pb2.RateLimitDescriptor()
    descriptor.entries.add(key=key, value=value)
    return rls_pb2.RateLimitRequest(domain="obs", descriptors=[descriptor])


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """(HELP text by family, value by (sample name, sorted labels)), read as Prometheus reads
    the classic text format: names exactly as written (prometheus_client's own parser would add
    ``_total`` to counters)."""
    helps: dict[str, str] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            helps[name] = doc
        elif line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, line
            labels = tuple(sorted(_LABEL.findall(match[2] or "")))
            samples[(match[1], labels)] = float(match[3])
    return helps, samples


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            return await response.text()


@pytest.mark.timeout(180)
async def test_every_queried_metric_is_exported_by_a_live_service(
    tmp_path: Path, redis_db: RedisServer
) -> None:
    queried = set()
    for expr in dashboard_exprs() + alert_exprs():
        queried |= promql_metric_names(expr)
    queried -= PROMETHEUS_OWN
    assert {"ratelimit_build_info", "process_cpu_seconds_total",
            "ratelimit_backend_breaker_open"} <= queried  # the parser saw the kit

    metrics_port = free_port()
    runtime, config_dir = config_dir_env(tmp_path, RULES)
    env = base_env(
        **runtime,
        RUNTIME_WATCH_ROOT="false",
        BACKEND_TYPE="redis",
        REDIS_SOCKET_TYPE="tcp",
        REDIS_URL=redis_db.url,
        REDIS_STARTUP_MAX_ELAPSED_TIME="10s",
        LOCAL_CACHE_SIZE_IN_BYTES="1048576",
        WORKERS="1",
        USE_PROMETHEUS="true",
        PROMETHEUS_ADDR=f"127.0.0.1:{metrics_port}",
        BREAKER_FAILURE_THRESHOLD="2",
        BREAKER_COOLDOWN="60s",
        LOG_LEVEL="INFO",
    )
    service = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.ports['gRPC']}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            # within, near and over the limit, then over from the local cache; a shadow rule over.
            for _ in range(5):
                await stub.ShouldRateLimit(request("user", "alice"))
            for _ in range(2):
                await stub.ShouldRateLimit(request("trial", "bob"))
            # A rejected reload: config_load_error.
            (config_dir / "broken.yaml").write_text("domain: [not, a, string]\n")
            await service.wait_for_line("Error loading new configuration")
            # The backend goes away: errors, then the breaker opens and rejects.
            redis_db.kill()
            for _ in range(4):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ShouldRateLimit(request("user", "carol"), timeout=10)
        text = await scrape(metrics_port)
    finally:
        await service.kill()

    helps, samples = parse_exposition(text)
    exported = {name for name, _ in samples}
    missing = queried - exported
    assert not missing, f"queried by the dashboard or alerts but not exported: {sorted(missing)}"
    for name, doc in helps.items():  # real HELP text, never the fallback
        assert doc and "docs/observability.md" not in doc, name
    assert samples[("ratelimit_build_info", (("version", __version__),))] == 1.0
    assert samples[("process_resident_memory_bytes", ())] > 1_000_000
    assert samples[("process_open_fds", ())] >= 3
    assert samples[("ratelimit_backend_breaker_open", ())] == 1.0
    assert samples[("ratelimit_service_config_load_error", ())] == 1.0
    over = ("ratelimit_service_rate_limit_over_limit", (("domain", "obs"), ("key1", "user")))
    assert samples[over] == 2.0

