"""The Prometheus sink (USE_PROMETHEUS): flushed stats under the reference's metric names (the
mapping its statsd_exporter applies), each metric bounded to ``max_series`` label sets, in the
sink's own registry, served by aiohttp on PROMETHEUS_ADDR at PROMETHEUS_PATH
(docs/observability.md (Prometheus)).

Every family has real HELP text (``HELP``; a fallback naming the stat for anything unlisted); the
families alerts use are declared at start (at 0) so alerts work before the first event. Beside the
stats the registry holds ``ratelimit_build_info{version}`` and prometheus_client's
``ProcessCollector`` (CPU, resident memory, open file descriptors of the serving process).
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import Metric

from ratelimit_svc import __version__
from ratelimit_svc.errors import SettingsError
from ratelimit_svc.stats.registry import DEFAULT_MAX_KEYS, PER_KEY_PREFIX, RULE_STATS

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic text format
# prometheus_client's (and client_golang's) default buckets, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_Labels = tuple[tuple[str, str], ...]

_RULE = "per rate-limit rule (domain and its first two descriptor keys)"
# HELP text of every family the service writes (docs/observability.md lists them).
HELP: dict[str, str] = {
    "ratelimit_service_rate_limit_total_hits": f"Hits counted, {_RULE}.",
    "ratelimit_service_rate_limit_over_limit": f"Hits answered OVER_LIMIT, {_RULE}.",
    "ratelimit_service_rate_limit_near_limit": (
        f"Hits above NEAR_LIMIT_RATIO of the limit, {_RULE}."
    ),
    "ratelimit_service_rate_limit_within_limit": f"Hits within the limit, {_RULE}.",
    "ratelimit_service_rate_limit_shadow_mode": (
        f"Hits over the limit of a shadow-mode rule (answered OK), {_RULE}."
    ),
    "ratelimit_service_rate_limit_over_limit_with_local_cache": (
        f"Over-limit hits answered from the local cache without a backend call, {_RULE}."
    ),
    "ratelimit_service_rate_limit_domain_not_found": "Descriptors for a domain with no rules.",
    "ratelimit_service_should_rate_limit_error": (
        "ShouldRateLimit calls that failed: err_type redis_error (the backend failed or its "
        "circuit breaker rejected the call) or service_error (anything else)."
    ),
    "ratelimit_service_total_requests": "RPCs received, by gRPC method.",
    "ratelimit_service_response_time_seconds": "Time to answer an RPC, by gRPC method.",
    "ratelimit_service_config_load_success": "Rule configurations loaded and swapped in.",
    "ratelimit_service_config_load_error": (
        "Rule configurations rejected (the previous one stays in force)."
    ),
    "ratelimit_service_global_shadow_mode": (
        "Requests over a limit answered OK because SHADOW_MODE is on."
    ),
    "ratelimit_redis_pool_cx_active": "Open connections to the Redis backend.",
    "ratelimit_redis_pool_cx_total": "Connections opened to the Redis backend.",
    "ratelimit_redis_pool_cx_local_close": "Connections to the Redis backend closed by us.",
    "ratelimit_backend_breaker_open": (
        "1 while the backend circuit breaker is open or half-open, else 0."
    ),
    "ratelimit_backend_breaker_in_flight": "Backend calls in flight.",
    "ratelimit_backend_breaker_opened": "Times the backend circuit breaker opened.",
    "ratelimit_backend_breaker_rejected": "Backend calls failed fast by the open breaker.",
    "ratelimit_backend_breaker_overloaded": (
        "Backend calls refused because BACKEND_MAX_IN_FLIGHT calls were in flight."
    ),
    "ratelimit_localcache_hitCount": "Local over-limit cache lookups that found the key.",
    "ratelimit_localcache_missCount": "Local over-limit cache lookups that missed.",
    "ratelimit_localcache_lookupCount": "Local over-limit cache lookups.",
    "ratelimit_localcache_entryCount": "Keys in the local over-limit cache.",
    "ratelimit_localcache_evacuateCount": "Keys evicted from the local cache to stay in its size.",
    "ratelimit_localcache_expiredCount": "Keys dropped from the local cache as their window ended.",
    "ratelimit_localcache_overwriteCount": "Local cache entries overwritten.",
    "ratelimit_localcache_averageAccessTime": "Not measured by this service (always 0).",
    "ratelimit_build_info": "The running ratelimit-svc version (the value is always 1).",
}
# Declared at start, so that they are exported (and alertable) before their first event.
_DECLARED: tuple[tuple[str, str, _Labels], ...] = (
    ("ratelimit_service_config_load_success", "counter", ()),
    ("ratelimit_service_config_load_error", "counter", ()),
    ("ratelimit_service_should_rate_limit_error", "counter", (("err_type", "redis_error"),)),
    ("ratelimit_service_should_rate_limit_error", "counter", (("err_type", "service_error"),)),
    ("ratelimit_service_total_requests", "counter", (("grpc_method", "ShouldRateLimit"),)),
)


def _go_float(value: float) -> str:
    """A value as client_golang writes it (``0.005``, ``1.0``, ``+Inf``)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape(name: str) -> str:
    """statsd_exporter's name for an unmapped stat."""
    escaped = _INVALID.sub("_", name)
    return f"_{escaped}" if escaped[:1].isdigit() else escaped


@dataclass(slots=True)
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            self.buckets[index] += 1
        self.count += 1
        self.total += value


@dataclass(slots=True)
class _Family:
    kind: str  # counter | gauge | histogram
    help: str
    series: OrderedDict[_Labels, float | _Histogram] = field(default_factory=OrderedDict)


def map_counter(name: str) -> tuple[str, _Labels]:
    """The metric name and labels of a statsd counter name (see the module docstring)."""
    if name.startswith(PER_KEY_PREFIX):
        key, _, stat = name[len(PER_KEY_PREFIX) :].rpartition(".")
        parts = key.split(".") if key else []
        if stat in RULE_STATS and len(parts) >= 2:
            labels = [("domain", parts[0]), ("key1", parts[1])]
            if len(parts) > 2:
                labels.append(("key2", parts[2]))
            return f"ratelimit_service_rate_limit_{stat}", tuple(labels)
        if stat == "domain_not_found" and len(parts) == 1:
            return "ratelimit_service_rate_limit_domain_not_found", (("domain", parts[0]),)
    if name.startswith("ratelimit.service.call.should_rate_limit."):
        err_type = name.rpartition(".")[2]
        return "ratelimit_service_should_rate_limit_error", (("err_type", err_type),)
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "ratelimit_server" and parts[2] == "total_requests":
        return "ratelimit_service_total_requests", (("grpc_method", parts[1]),)
    return escape(name), ()


class PrometheusSink:
    """A ``StatsSink`` holding metrics for scrapes, and the HTTP endpoint that serves them."""

    def __init__(
        self,
        addr: str = ":9090",
        path: str = "/metrics",
        *,
        max_series: int = DEFAULT_MAX_KEYS,
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.addr, self.path = addr, path
        self.max_series = max_series
        self.before_scrape = before_scrape
        self._families: dict[str, _Family] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a Collector by duck typing
        # This process's CPU, memory and descriptors (read from /proc; nothing on other systems).
        ProcessCollector(registry=self.registry)
        self._series("ratelimit_build_info", "gauge", (("version", __version__),))[
            (("version", __version__),)
        ] = 1.0
        for metric, kind, labels in _DECLARED:
            self._series(metric, kind, labels).setdefault(labels, 0.0)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- StatsSink -------------------------------------------------------------------------------

    def flush_counter(self, name: str, value: int) -> None:
        metric, labels = map_counter(name)
        series = self._series(metric, "counter", labels)
        series[labels] = float(series.get(labels, 0.0)) + value  # type: ignore[arg-type]

    def flush_gauge(self, name: str, value: int) -> None:
        metric = escape(name)
        self._series(metric, "gauge", ())[()] = float(value)

    def flush_timer(self, name: str, milliseconds: float) -> None:
        parts = name.split(".")
        labels: _Labels = ()
        metric = escape(name)
        if len(parts) == 3 and parts[0] == "ratelimit_server" and parts[2] == "response_time":
            metric, labels = "ratelimit_service_response_time_seconds", (("grpc_method", parts[1]),)
        series = self._series(metric, "histogram", labels)
        histogram = series.get(labels)
        if not isinstance(histogram, _Histogram):
            histogram = series[labels] = _Histogram()
        histogram.observe(milliseconds / 1000.0)

    def _series(
        self, metric: str, kind: str, labels: _Labels
    ) -> OrderedDict[_Labels, float | _Histogram]:
        family = self._families.get(metric)
        if family is None:
            help_text = HELP.get(metric, f"The service's stat {metric} (docs/observability.md).")
            family = self._families[metric] = _Family(kind, help_text)
        series = family.series
        if labels in series:
            series.move_to_end(labels)
        elif len(series) >= self.max_series:
            series.popitem(last=False)
        return series

    # -- prometheus_client Collector -------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for name, family in sorted(self._families.items()):
            metric = Metric(name, family.help, family.kind)
            for labels, value in family.series.items():
                label_map = dict(labels)
                if isinstance(value, _Histogram):
                    cumulative = 0
                    for bound, count in zip(BUCKETS, value.buckets, strict=True):
                        cumulative += count
                        bucket = {**label_map, "le": _go_float(bound)}
                        metric.add_sample(f"{name}_bucket", bucket, cumulative)
                    metric.add_sample(f"{name}_bucket", {**label_map, "le": "+Inf"}, value.count)
                    metric.add_sample(f"{name}_count", label_map, value.count)
                    metric.add_sample(f"{name}_sum", label_map, value.total)
                else:
                    metric.add_sample(name, label_map, value)
            yield metric

    def render(self) -> bytes:
        """The text exposition format, as client_golang writes it.

        prometheus_client's ``generate_latest`` follows OpenMetrics, where a counter family is
        always named ``<name>_total``; the reference's counters are not (``total_requests``), so
        the families are written here, unchanged.
        """
        if self.before_scrape is not None:
            self.before_scrape()
        out: list[str] = []
        for metric in self.registry.collect():
            name = metric.name
            if metric.type == "counter" and any(s.name == f"{name}_total" for s in metric.samples):
                name += "_total"  # prometheus_client's own counters (process_cpu_seconds_total)
            out.append(f"# HELP {name} {_escape_help(metric.documentation)}\n")
            out.append(f"# TYPE {name} {metric.type}\n")
            for sample in metric.samples:
                labels = ",".join(
                    f'{k}="{_escape_label(v)}"' for k, v in sorted(sample.labels.items())
                )
                shown = f"{{{labels}}}" if labels else ""
                out.append(f"{sample.name}{shown} {_go_float(sample.value)}\n")
        return "".join(out).encode()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        host, colon, port = self.addr.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not colon or not port.isdigit() or int(port) > 65535:
            raise SettingsError(
                f"invalid value for PROMETHEUS_ADDR: {self.addr!r} (expected host:port or :port)"
            )
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or None, int(port))
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.warning("Listening for Prometheus on '%s:%d%s'", host, self.port, self.path)

    async def _handle(self, request: web.Request) -> web.Response:
        body = self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def flush(self) -> None:
        """Nothing to send: Prometheus pulls."""

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
