"""The statsd (UDP, TCP), DogStatsD and Prometheus sinks, received by real listeners
(docs/observability.md (Stats))."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from support.service_env import base_env, write_rules
from test_grpc import RULES as GRPC_RULES
from test_grpc import descriptor

from ratelimit_svc.app import App
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.prometheus import PrometheusSink, map_counter
from ratelimit_svc.stats.registry import MemoryStats
from ratelimit_svc.stats.reporter import sink_kind
from ratelimit_svc.stats.statsd import (
    UDP_PACKET_BYTES,
    Mogrifier,
    StatsdSink,
    format_number,
    tag_suffix,
)

NESTED = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: a
    descriptors:
      - key: b
        descriptors:
          - key: c
            rate_limit: {unit: hour, requests_per_unit: 100}
"""


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.packets.append(data)
        self.arrived.set()

    def lines(self) -> list[str]:
        return [line for p in self.packets for line in p.decode().splitlines()]


@pytest.fixture
async def udp() -> AsyncIterator[tuple[UdpListener, int]]:
    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(UdpListener, local_addr=("127.0.0.1", 0))
    try:
        yield listener, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


class TcpListener:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = asyncio.Event()
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                self.lines.append(line.decode().rstrip("\n"))
                self.changed.set()
        finally:
            writer.close()


async def wait_for_lines(lines: list[str] | UdpListener, *wanted: str) -> list[str]:
    """Wait (5s at most) until every wanted line has arrived; each is a regex."""
    async with asyncio.timeout(5.0):
        while True:
            got = lines.lines() if isinstance(lines, UdpListener) else lines
            if all(any(re.fullmatch(w, line) for line in got) for w in wanted):
                return got
            await asyncio.sleep(0.01)


async def wait_for_counter_sums(listener: UdpListener, wanted: dict[str, int]) -> None:
    """Wait (30s at most) until the deltas sent for each counter add up to its wanted total."""
    async with asyncio.timeout(30.0):
        while True:
            sums: dict[str, int] = {}
            for line in listener.lines():
                name, _, rest = line.rpartition(":")
                value, _, kind = rest.partition("|")
                if kind == "c":
                    sums[name] = sums.get(name, 0) + int(value)
            if all(sums.get(name) == total for name, total in wanted.items()):
                return
            await asyncio.sleep(0.01)


# -- formatting ------------------------------------------------------------------------------------


def test_numbers_and_tags_are_formatted_like_gostats() -> None:
    assert format_number(12.0) == "12"
    assert format_number(1.25) == "1.250000"
    assert tag_suffix({"env": "prod", "az": "us.east:1|a", "empty": ""}) == ".__az=us_east_1_a.__env=prod"


async def test_statsd_udp_lines_with_extra_tags(udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    sink = StatsdSink("127.0.0.1", port, protocol="udp", extra_tags={"env": "prod"})
    stats = MemoryStats()
    stats.sink = sink
    await sink.start()
    try:
        stats.add("ratelimit.service.rate_limit.basic.key1.total_hits", 3)
        stats.set_gauge("ratelimit.redis_pool.cx_active", 2)
        stats.observe_ms("ratelimit_server.ShouldRateLimit.response_time", 1.5)
        stats.flush()
        await sink.flush()
        lines = await wait_for_lines(
            listener,
            re.escape("ratelimit.service.rate_limit.basic.key1.total_hits.__env=prod:3|c"),
            re.escape("ratelimit.redis_pool.cx_active.__env=prod:2|g"),
            re.escape("ratelimit_server.ShouldRateLimit.response_time.__env=prod:1.500000|ms"),
        )
        assert len(lines) == 3
        # counters are deltas: a second flush of an unchanged counter sends nothing for it
        stats.add("ratelimit.service.rate_limit.basic.key1.total_hits", 1)
        stats.flush()
        await sink.flush()
        await wait_for_lines(listener, re.escape("ratelimit.service.rate_limit.basic.key1.total_hits.__env=prod:1|c"))
    finally:
        await sink.close()


async def test_statsd_udp_packets_stay_under_the_mtu(udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    sink = StatsdSink("127.0.0.1", port, protocol="udp")
    await sink.start()
    try:
        for i in range(200):
            sink.flush_counter(f"ratelimit.service.rate_limit.d.key_{i:04d}.total_hits", i + 1)
        await sink.flush()
        lines = await wait_for_lines(listener, re.escape("ratelimit.service.rate_limit.d.key_0199.total_hits:200|c"))
        assert len(lines) == 200
        assert len(listener.packets) > 1
        assert all(len(p) <= UDP_PACKET_BYTES for p in listener.packets)
    finally:
        await sink.close()


async def test_statsd_tcp_lines_and_reconnect_after_statsd_returns(caplog: pytest.LogCaptureFixture) -> None:
    listener = TcpListener()
    server = await asyncio.start_server(listener.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()  # nothing listens yet
    sink = StatsdSink("127.0.0.1", port, protocol="tcp")
    await sink.start()
    try:
        sink.flush_counter("ratelimit.service.config_load_success", 1)
        with caplog.at_level(logging.WARNING, logger="ratelimit_svc.stats.statsd"):
            await sink.flush()  # refused: logged once, the line is kept
            await sink.flush()
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1  # once, not per flush
        server = await asyncio.start_server(listener.handle, "127.0.0.1", port)
        try:
            sink.flush_gauge("ratelimit.redis_pool.cx_active", 1)
            await sink.flush()
            await wait_for_lines(
                listener.lines,
                re.escape("ratelimit.service.config_load_success:1|c"),
                re.escape("ratelimit.redis_pool.cx_active:1|g"),
            )
            assert listener.connections == 1
        finally:
            await sink.close()
            server.close()
            await server.wait_closed()
    finally:
        await sink.close()


async def test_dogstatsd_sends_tags(udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    sink = StatsdSink("127.0.0.1", port, protocol="udp", extra_tags={"env": "prod", "az": "a"}, dogstatsd=True)
    await sink.start()
    try:
        sink.flush_counter("ratelimit.service.rate_limit.basic.key1.over_limit", 2)
        sink.flush_timer("ratelimit_server.ShouldRateLimit.response_time", 3.0)
        await sink.flush()
        await wait_for_lines(
            listener,
            re.escape("ratelimit.service.rate_limit.basic.key1.over_limit:2|c|#az:a,env:prod"),
            re.escape("ratelimit_server.ShouldRateLimit.response_time:3|ms|#az:a,env:prod"),
        )
    finally:
        await sink.close()


# -- choosing the sink -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "kind"),
    [
        ({}, "statsd"),
        ({"USE_STATSD": "false"}, None),
        ({"DISABLE_STATS": "true"}, None),
        ({"USE_STATSD": "false", "USE_DOG_STATSD": "true"}, "dogstatsd"),
        ({"USE_STATSD": "false", "USE_PROMETHEUS": "true"}, "prometheus"),
        ({"USE_STATSD": "false", "USE_PROMETHEUS": "true", "DISABLE_STATS": "true"}, None),
    ],
)
def test_sink_table(env: dict[str, str], kind: str | None) -> None:
    assert sink_kind(Settings.from_env(env).stats) == kind


# -- the app: statsd ---------------------------------------------------------------------------------


async def ask(app: App, *requests: rls_pb2.RateLimitRequest) -> None:
    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        for request in requests:
            try:
                await stub.ShouldRateLimit(request)
            except grpc.aio.AioRpcError:
                pass


KEY1 = rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "x"))])
NESTED_REQUEST = rls_pb2.RateLimitRequest(
    domain="basic", descriptors=[descriptor(("a", "1"), ("b", "2"), ("c", "3"))]
)
BAD = rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("key1", "x"))])


async def test_app_flushes_to_statsd_every_interval(tmp_path: Path, udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        USE_STATSD="true",
        STATSD_PROTOCOL="udp",
        STATSD_PORT=str(port),
        STATSD_HOST="127.0.0.1",
        STATS_FLUSH_INTERVAL="50ms",
        EXTRA_TAGS="cluster:c1",
    )
    async with App(Settings.from_env(env)) as app:
        assert app.reporter is not None
        await ask(app, KEY1, KEY1, KEY1, BAD)
        # Counters arrive as deltas, one flush or several (a busy machine spreads the asks over
        # more than one 50ms interval): wait for their sums.
        await wait_for_counter_sums(
            listener,
            {
                "ratelimit.service.rate_limit.basic.key1.total_hits.__cluster=c1": 3,
                "ratelimit.service.rate_limit.basic.key1.within_limit.__cluster=c1": 2,
                "ratelimit.service.rate_limit.basic.key1.over_limit.__cluster=c1": 1,
                "ratelimit.service.config_load_success.__cluster=c1": 1,
                "ratelimit.service.call.should_rate_limit.service_error.__cluster=c1": 1,
                "ratelimit_server.ShouldRateLimit.total_requests.__cluster=c1": 4,
            },
        )
        await wait_for_lines(
            listener, r"ratelimit_server\.ShouldRateLimit\.response_time\.__cluster=c1:[0-9.]+\|ms"
        )


async def test_app_flushes_what_is_left_when_it_stops(tmp_path: Path, udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        USE_STATSD="true",
        STATSD_PROTOCOL="udp",
        STATSD_PORT=str(port),
        STATSD_HOST="127.0.0.1",
        STATS_FLUSH_INTERVAL="1h",
    )
    async with App(Settings.from_env(env)) as app:
        await ask(app, KEY1)
        await asyncio.sleep(0.1)
        assert not any("total_hits" in line for line in listener.lines())
    await wait_for_lines(listener, re.escape("ratelimit.service.rate_limit.basic.key1.total_hits:1|c"))


async def test_disable_stats_sends_nothing(tmp_path: Path, udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        USE_STATSD="true",
        STATSD_PROTOCOL="udp",
        STATSD_PORT=str(port),
        STATSD_HOST="127.0.0.1",
        STATS_FLUSH_INTERVAL="10ms",
        DISABLE_STATS="true",
    )
    async with App(Settings.from_env(env)) as app:
        assert app.reporter is None
        await ask(app, KEY1)
        await asyncio.sleep(0.1)
        assert app.stats.get("ratelimit.service.rate_limit.basic.key1.total_hits") == 1  # still counted
    await asyncio.sleep(0.05)
    assert listener.packets == []


# -- the app: Prometheus -----------------------------------------------------------------------------


def test_prometheus_mapping_table() -> None:
    assert map_counter("ratelimit.service.rate_limit.basic.key1.total_hits") == (
        "ratelimit_service_rate_limit_total_hits", (("domain", "basic"), ("key1", "key1")))
    assert map_counter("ratelimit.service.rate_limit.d.a_1.b_2.c.near_limit") == (
        "ratelimit_service_rate_limit_near_limit", (("domain", "d"), ("key1", "a_1"), ("key2", "b_2")))
    assert map_counter("ratelimit.service.rate_limit.nope.domain_not_found") == (
        "ratelimit_service_rate_limit_domain_not_found", (("domain", "nope"),))
    assert map_counter("ratelimit.service.call.should_rate_limit.redis_error") == (
        "ratelimit_service_should_rate_limit_error", (("err_type", "redis_error"),))
    assert map_counter("ratelimit_server.ShouldRateLimit.total_requests") == (
        "ratelimit_service_total_requests", (("grpc_method", "ShouldRateLimit"),))
    assert map_counter("ratelimit.service.config_load_error") == ("ratelimit_service_config_load_error", ())
    assert map_counter("ratelimit.redis_pool.cx_total") == ("ratelimit_redis_pool_cx_total", ())


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_app_serves_prometheus_with_the_reference_names(tmp_path: Path) -> None:
    env = base_env(
        **write_rules(tmp_path, NESTED),
        USE_STATSD="false",
        USE_PROMETHEUS="true",
        PROMETHEUS_ADDR="127.0.0.1:0",
        PROMETHEUS_PATH="/custom",
        STATS_FLUSH_INTERVAL="1h",  # the scrape itself flushes
    )
    async with App(Settings.from_env(env)) as app:
        assert app.reporter is not None and isinstance(app.reporter.sink, PrometheusSink)
        port = app.reporter.sink.port
        await ask(app, KEY1, KEY1, KEY1, NESTED_REQUEST, BAD)
        status, content_type, body = await scrape(port, "/custom")
        assert status == 200
        assert content_type.startswith("text/plain")
        lines = body.splitlines()
        for expected in (
            'ratelimit_service_rate_limit_total_hits{domain="basic",key1="key1"} 3.0',
            'ratelimit_service_rate_limit_over_limit{domain="basic",key1="key1"} 1.0',
            'ratelimit_service_rate_limit_within_limit{domain="basic",key1="key1"} 2.0',
            'ratelimit_service_rate_limit_total_hits{domain="basic",key1="a",key2="b"} 1.0',
            'ratelimit_service_should_rate_limit_error{err_type="service_error"} 1.0',
            'ratelimit_service_total_requests{grpc_method="ShouldRateLimit"} 5.0',
            'ratelimit_service_response_time_seconds_count{grpc_method="ShouldRateLimit"} 5.0',
            'ratelimit_service_response_time_seconds_bucket{grpc_method="ShouldRateLimit",le="+Inf"} 5.0',
            "ratelimit_service_config_load_success 1.0",
            "# TYPE ratelimit_service_rate_limit_total_hits counter",
            "# TYPE ratelimit_service_config_load_success counter",
            "# TYPE ratelimit_service_total_requests counter",
            "# TYPE ratelimit_service_response_time_seconds histogram",
        ):
            assert expected in lines, (expected, body)
        assert any(line.startswith('ratelimit_service_response_time_seconds_bucket{grpc_method="ShouldRateLimit",le="0.005"}') for line in lines)
        # counters keep accumulating across scrapes
        await ask(app, KEY1)
        _, _, body = await scrape(port, "/custom")
        assert 'ratelimit_service_rate_limit_total_hits{domain="basic",key1="key1"} 4.0' in body.splitlines()
        assert (await scrape(port, "/metrics"))[0] == 404


async def test_prometheus_series_are_bounded() -> None:
    sink = PrometheusSink("127.0.0.1:0", max_series=10)
    for i in range(100):
        sink.flush_counter(f"ratelimit.service.rate_limit.d.user_{i}.total_hits", 1)
    body = sink.render().decode()
    series = [line for line in body.splitlines() if line.startswith("ratelimit_service_rate_limit_total_hits{")]
    assert len(series) == 10
    assert 'ratelimit_service_rate_limit_total_hits{domain="d",key1="user_99"} 1.0' in series


async def test_prometheus_uses_its_own_registry() -> None:
    from prometheus_client import REGISTRY

    sink = PrometheusSink("127.0.0.1:0")
    sink.flush_counter("ratelimit.service.config_load_success", 1)
    assert REGISTRY.get_sample_value("ratelimit_service_config_load_success") is None
    assert sink.registry.get_sample_value("ratelimit_service_config_load_success") == 1.0


async def test_dogstatsd_mogrifier_turns_name_parts_into_tags(udp: tuple[UdpListener, int]) -> None:
    listener, port = udp
    mogrifier = Mogrifier(
        re.compile(r"^ratelimit\.service\.rate_limit\.(.*)\.(.*)\.(.*)$"),
        "ratelimit.service.rate_limit.$3",
        (("domain", "$1"), ("descriptor", "$2")),
    )
    sink = StatsdSink("127.0.0.1", port, protocol="udp", dogstatsd=True, mogrifiers=[mogrifier])
    await sink.start()
    try:
        sink.flush_counter("ratelimit.service.rate_limit.mongo_cps.database_users.within_limit", 1)
        sink.flush_counter("ratelimit.service.config_load_success", 1)
        await sink.flush()
        await wait_for_lines(
            listener,
            re.escape("ratelimit.service.rate_limit.within_limit:1|c|#domain:mongo_cps,descriptor:database_users"),
            re.escape("ratelimit.service.config_load_success:1|c"),
        )
    finally:
        await sink.close()
