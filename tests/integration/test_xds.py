"""Config over xDS (CONFIG_TYPE=GRPC_XDS_SOTW, docs/xds.md): the ADS client against a real control plane.

The control plane is tests/support/xds_server.py, a grpc.aio ADS server on a loopback port. Nothing here
sleeps on the wall clock: the client's reconnect backoff goes through ``FakeSleep``, which records
each delay and blocks until the test lets it go, and every wait is for an event with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trustme
from google.protobuf import any_pb2, struct_pb2
from support.clock import FakeClock
from support.proto_peer import describe, method_paths
from support.xds_protos import peer_env
from support.xds_server import WAIT_SECONDS, AdsServer, rate_limit_config, rule

from ratelimit_svc.backends.memory import MemoryStore
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.config.xds import TYPE_URL, Backoff, XdsConfigClient, load_resources
from ratelimit_svc.errors import ConfigError, SettingsError
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions
from ratelimit_svc.pb.envoy.config.core.v3 import base_pb2
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.pb.ratelimit.config.ratelimit.v3 import rls_conf_pb2
from ratelimit_svc.pb.ratelimit.deps.google.rpc import status_pb2
from ratelimit_svc.servers.grpc_aio import start_grpc_server
from ratelimit_svc.service import RateLimitService
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.stats.registry import STAT_LOAD_ERROR, STAT_LOAD_SUCCESS, MemoryStats

TESTS = Path(__file__).resolve().parents[1]
MINUTE, HOUR, DAY, WEEK = rls_conf_pb2.MINUTE, rls_conf_pb2.HOUR, rls_conf_pb2.DAY, rls_conf_pb2.WEEK


def unnamed_unit(number: int) -> rls_conf_pb2.RateLimitUnit:
    """A unit number this proto has no name for (a newer control plane could send one)."""
    return cast(rls_conf_pb2.RateLimitUnit, number)


# -- fixtures ----------------------------------------------------------------------------------


class FakeSleep:
    """The client's backoff sleep: records the delay, then blocks until the test calls proceed()."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._permits = asyncio.Semaphore(0)
        self._called = asyncio.Condition()

    async def __call__(self, delay: float) -> None:
        async with self._called:
            self.delays.append(delay)
            self._called.notify_all()
        await self._permits.acquire()

    def proceed(self, times: int = 1) -> None:
        for _ in range(times):
            self._permits.release()

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(WAIT_SECONDS), self._called:
            await self._called.wait_for(lambda: len(self.delays) >= count)


class Applied:
    """The client's ConfigSink (the App's role): every config reported, awaitable, and the
    loads counted as the App counts them."""

    def __init__(self, stats: MemoryStats) -> None:
        self.configs: list[RateLimitConfig] = []
        self.stats = stats
        self._changed = asyncio.Event()

    def loaded(
        self, config: RateLimitConfig, detail: str = "", *, pickled: bytes | None = None
    ) -> None:
        self.configs.append(config)
        self.stats.add(STAT_LOAD_SUCCESS)
        self._changed.set()

    def failed(self, error: ConfigError) -> None:
        self.stats.add(STAT_LOAD_ERROR)

    def empty(self, reason: str) -> None:
        raise AssertionError("xDS never reports an empty config")

    def adopted(self, config: RateLimitConfig | None) -> None:
        raise AssertionError("xDS loads its configs itself")

    @property
    def latest(self) -> RateLimitConfig | None:
        return self.configs[-1] if self.configs else None

    async def wait_for(self, predicate: Callable[[RateLimitConfig], bool]) -> RateLimitConfig:
        async with asyncio.timeout(WAIT_SECONDS):
            while self.latest is None or not predicate(self.latest):
                self._changed.clear()
                await self._changed.wait()
        return self.latest


def limits(config: RateLimitConfig) -> dict[str, tuple[int, str]]:
    return {r.stats_key: (r.requests_per_unit, r.unit.name) for r in config.rules()}


def xds_settings(port: int, **extra: str) -> Settings:
    env = {
        "CONFIG_TYPE": "GRPC_XDS_SOTW",
        "CONFIG_GRPC_XDS_SERVER_URL": f"127.0.0.1:{port}",
        "XDS_CLIENT_BACKOFF_JITTER": "false",
        "XDS_CLIENT_BACKOFF_INITIAL_INTERVAL": "2s",
        "XDS_CLIENT_BACKOFF_MAX_INTERVAL": "5s",
    }
    env.update(extra)
    return Settings.from_env(env)


@pytest.fixture
async def ads() -> AsyncIterator[AdsServer]:
    server = AdsServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sleeper() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def stats() -> MemoryStats:
    return MemoryStats()


@pytest.fixture
def applied(stats: MemoryStats) -> Applied:
    return Applied(stats)


Start = Callable[..., Any]


@pytest.fixture
async def start_client(
    sleeper: FakeSleep, applied: Applied, stats: MemoryStats
) -> AsyncIterator[Start]:
    """start_client(settings) -> a started XdsConfigClient, closed after the test."""
    clients: list[XdsConfigClient] = []

    async def start(settings: Settings, **kwargs: Any) -> XdsConfigClient:
        client = XdsConfigClient(settings, sleep=sleeper, **kwargs)
        clients.append(client)
        await client.start(applied)
        return client

    yield start
    for client in clients:
        await client.close()


BASIC = rate_limit_config("basic", "edge", rule("path", "/api", per_unit=2))


# -- the protocol --------------------------------------------------------------------------------


async def test_initial_load_is_acked_with_version_and_nonce(
    ads: AdsServer, start_client: Start, applied: Applied, stats: MemoryStats
) -> None:
    await ads.set_snapshot("v1", [BASIC])
    client = await start_client(xds_settings(ads.port))

    async with asyncio.timeout(WAIT_SECONDS):
        config = await client.wait_first_config()
    assert limits(config) == {"edge.path_/api": (2, "MINUTE")}
    assert applied.configs == [config] and client.config is config and client.version == "v1"

    subscribe = ads.requests[0].request
    assert subscribe.type_url == TYPE_URL
    assert list(subscribe.resource_names) == []  # wildcard
    assert (subscribe.version_info, subscribe.response_nonce) == ("", "")
    assert not subscribe.HasField("error_detail")
    ack = await ads.wait_request(lambda s: s.is_ack)
    assert (ack.request.version_info, ack.request.response_nonce) == ("v1", ads.last_nonce)
    assert ack.request.type_url == TYPE_URL
    assert stats.get(STAT_LOAD_SUCCESS) == 1 and stats.get(STAT_LOAD_ERROR) == 0


async def test_node_and_additional_headers_reach_the_server(
    ads: AdsServer, start_client: Start
) -> None:
    settings = xds_settings(
        ads.port,
        CONFIG_GRPC_XDS_NODE_ID="rls-7",
        CONFIG_GRPC_XDS_NODE_METADATA="zone=eu-west-1,team=edge",
        CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS="Authorization:Bearer tok3n,x-tenant:blue",
    )
    await start_client(settings)
    seen = await ads.wait_request(lambda s: True)
    node = seen.request.node
    assert node.id == "rls-7"
    assert dict(node.metadata) == {"zone": "eu-west-1", "team": "edge"}
    assert node.user_agent_name == "ratelimit-svc"
    assert seen.metadata["authorization"] == "Bearer tok3n"
    assert seen.metadata["x-tenant"] == "blue"


async def test_pushed_snapshot_replaces_the_config(
    ads: AdsServer, start_client: Start, applied: Applied, stats: MemoryStats
) -> None:
    await ads.set_snapshot("v1", [BASIC])
    client = await start_client(xds_settings(ads.port))
    await applied.wait_for(lambda c: "edge" in c.domains)

    # A full state: "edge" changes, "billing" appears; a domain left out of a snapshot goes away.
    await ads.set_snapshot(
        "v2",
        [
            rate_limit_config("basic", "edge", rule("path", "/api", per_unit=50, unit=HOUR)),
            rate_limit_config("billing", "billing", rule("customer", per_unit=7)),
        ],
    )
    config = await applied.wait_for(lambda c: "billing" in c.domains)
    assert limits(config) == {
        "edge.path_/api": (50, "HOUR"),
        "billing.customer": (7, "MINUTE"),
    }
    ack = await ads.wait_request(lambda s: s.is_ack and s.request.version_info == "v2")
    assert ack.request.response_nonce == ads.last_nonce

    await ads.set_snapshot("v3", [rate_limit_config("billing", "billing", rule("customer"))])
    config = await applied.wait_for(lambda c: "edge" not in c.domains)
    assert limits(config) == {"billing.customer": (10, "MINUTE")}
    assert client.version == "v3"
    assert stats.get(STAT_LOAD_SUCCESS) == 3


async def test_bad_snapshot_is_nacked_and_the_old_config_stays(
    ads: AdsServer, start_client: Start, applied: Applied, stats: MemoryStats
) -> None:
    await ads.set_snapshot("v1", [BASIC])
    client = await start_client(xds_settings(ads.port))
    good = await applied.wait_for(lambda c: True)
    v1_nonce = ads.last_nonce
    await ads.wait_request(lambda s: s.is_ack)

    bad = rate_limit_config(
        "broken", "edge", rls_conf_pb2.RateLimitDescriptor(
            key="path", rate_limit=rls_conf_pb2.RateLimitPolicy(requests_per_unit=5)
        )
    )
    await ads.set_snapshot("v2", [bad])
    nack = await ads.wait_request(lambda s: s.is_nack)
    # The NACK names the last accepted version and the rejected response's nonce.
    assert nack.request.version_info == "v1"
    assert nack.request.response_nonce == ads.last_nonce != v1_nonce
    detail = nack.request.error_detail
    assert detail.message == "broken: invalid rate limit unit 'UNKNOWN' (descriptors[0].rate_limit)"
    assert detail.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert applied.configs == [good] and client.config is good and client.version == "v1"
    assert stats.get(STAT_LOAD_ERROR) == 1

    await ads.set_snapshot("v3", [rate_limit_config("basic", "edge", rule("path", per_unit=3))])
    config = await applied.wait_for(lambda c: c is not good)
    assert limits(config) == {"edge.path": (3, "MINUTE")}
    ack = await ads.wait_request(lambda s: s.is_ack and s.request.version_info == "v3")
    assert ack.request.response_nonce == ads.last_nonce
    assert stats.get(STAT_LOAD_SUCCESS) == 2


async def test_a_first_snapshot_that_fails_is_nacked_with_no_version(
    ads: AdsServer, start_client: Start, applied: Applied
) -> None:
    await ads.set_snapshot("v1", [rate_limit_config("a", "dup", rule("k")),
                                  rate_limit_config("b", "dup", rule("j"))])
    client = await start_client(xds_settings(ads.port))
    waiter = asyncio.create_task(client.wait_first_config())
    nack = await ads.wait_request(lambda s: s.is_nack)
    assert nack.request.version_info == ""
    assert nack.request.error_detail.message == "b: duplicate domain 'dup' in config file (domain)"
    assert not waiter.done() and applied.configs == [] and client.config is None

    await ads.set_snapshot("v2", [rate_limit_config("a", "dup", rule("k"))])
    async with asyncio.timeout(WAIT_SECONDS):
        config = await waiter
    assert limits(config) == {"dup.k": (10, "MINUTE")}


async def test_merge_domain_config_merges_resources_of_one_domain(
    ads: AdsServer, start_client: Start, applied: Applied
) -> None:
    await ads.set_snapshot("v1", [rate_limit_config("a", "dup", rule("k")),
                                  rate_limit_config("b", "dup", rule("j", per_unit=4))])
    await start_client(xds_settings(ads.port, MERGE_DOMAIN_CONFIG="true"))
    config = await applied.wait_for(lambda c: True)
    assert limits(config) == {"dup.k": (10, "MINUTE"), "dup.j": (4, "MINUTE")}


async def test_resource_of_another_type_is_nacked(ads: AdsServer, start_client: Start) -> None:
    stranger = any_pb2.Any()
    stranger.Pack(struct_pb2.Struct())
    await ads.set_snapshot("v1", [BASIC], raw=[stranger])
    await start_client(xds_settings(ads.port))
    nack = await ads.wait_request(lambda s: s.is_nack)
    assert nack.request.error_detail.message == (
        "xDS resource 1: type 'type.googleapis.com/google.protobuf.Struct' is not "
        f"'{TYPE_URL}'"
    )


async def test_client_reconnects_to_a_restarted_server(
    ads: AdsServer, start_client: Start, applied: Applied, sleeper: FakeSleep
) -> None:
    await ads.set_snapshot("v1", [BASIC])
    client = await start_client(xds_settings(ads.port))
    await applied.wait_for(lambda c: True)
    await ads.wait_request(lambda s: s.is_ack)
    assert sleeper.delays == []

    port = ads.port
    await ads.stop()
    await sleeper.wait_calls(1)  # the stream broke; the client is backing off
    assert sleeper.delays == [2.0]  # a healthy stream reset the backoff: the initial interval

    restarted = AdsServer()
    await restarted.start(port)
    try:
        await restarted.set_snapshot("v2", [rate_limit_config("new", "fresh", rule("k"))])
        sleeper.proceed()
        config = await applied.wait_for(lambda c: "fresh" in c.domains)
        assert limits(config) == {"fresh.k": (10, "MINUTE")}
        # The new stream resumed from the accepted version, then ACKed the new one.
        assert restarted.requests[0].request.version_info == "v1"
        await restarted.wait_request(lambda s: s.is_ack and s.request.version_info == "v2")
        assert client.version == "v2"
    finally:
        await restarted.stop()


async def test_backoff_grows_while_the_server_is_down(
    start_client: Start, applied: Applied, sleeper: FakeSleep
) -> None:
    with socket.socket() as probe:  # a port with nobody listening (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await start_client(xds_settings(port))
    await sleeper.wait_calls(1)
    sleeper.proceed(3)
    await sleeper.wait_calls(4)
    assert sleeper.delays == [2.0, 4.0, 5.0, 5.0]  # doubling, capped at the max interval
    assert client.config is None

    server = AdsServer()
    await server.start(port)
    try:
        await server.set_snapshot("v1", [BASIC])
        sleeper.proceed()
        await applied.wait_for(lambda c: "edge" in c.domains)
    finally:
        await server.stop()
    # A stream that delivered a response resets the backoff: the next outage starts afresh.
    await sleeper.wait_calls(5)
    assert sleeper.delays[4] == 2.0


@pytest.mark.parametrize(
    ("rand", "expected"),
    [
        (0.0, [5.0, 10.0, 20.0, 30.0, 30.0]),  # factor 1 - 0.5
        (0.5, [10.0, 20.0, 40.0, 60.0, 60.0]),  # factor 1
        (1.0, [15.0, 30.0, 60.0, 60.0, 60.0]),  # factor 1 + 0.5, never past the max
    ],
)
def test_backoff_jitter(rand: float, expected: list[float]) -> None:
    backoff = Backoff(10.0, 60.0, 0.5, True, lambda: rand)
    assert [backoff.next() for _ in expected] == expected
    backoff.reset()
    assert backoff.next() == expected[0]


def test_backoff_without_jitter_ignores_the_random_factor() -> None:
    backoff = Backoff(1.0, 8.0, 0.5, False, lambda: 0.0)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for _ in range(5000):  # doubling stays finite however long the server is down
        assert backoff.next() == 8.0


async def test_close_releases_a_waiter_and_stops_the_stream(
    ads: AdsServer, start_client: Start
) -> None:
    client = await start_client(xds_settings(ads.port))
    await ads.wait_request(lambda s: True)
    waiter = asyncio.create_task(client.wait_first_config())
    await client.close()
    with pytest.raises(ConfigError, match="closed before any configuration"):
        async with asyncio.timeout(WAIT_SECONDS):
            await waiter


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate only for xds.example.test, a client certificate; as files."""
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("xds.example.test")
    client = ca.issue_cert("ratelimit.example.test")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
    client.private_key_pem.write_to_path(str(directory / "client.key"))
    return {
        "dir": directory,
        "ca": ca.cert_pem.bytes(),
        "server_key": server.private_key_pem.bytes(),
        "server_chain": b"".join(blob.bytes() for blob in server.cert_chain_pems),
    }


def tls_env(pki: dict[str, Any], **extra: str) -> dict[str, str]:
    env = {
        "CONFIG_GRPC_XDS_SERVER_USE_TLS": "true",
        "CONFIG_GRPC_XDS_SERVER_TLS_CACERT": str(pki["dir"] / "ca.pem"),
        "CONFIG_GRPC_XDS_CLIENT_TLS_CERT": str(pki["dir"] / "client.pem"),
        "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": str(pki["dir"] / "client.key"),
        "CONFIG_GRPC_XDS_SERVER_TLS_SAN": "xds.example.test",
    }
    env.update(extra)
    return env


@pytest.fixture
async def tls_ads(pki: dict[str, Any]) -> AsyncIterator[AdsServer]:
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"], pki["server_chain"])],
        root_certificates=pki["ca"],
        require_client_auth=True,  # mTLS: the client's certificate is checked too
    )
    server = AdsServer()
    await server.start(credentials=credentials)
    await server.set_snapshot("v1", [BASIC])
    yield server
    await server.stop()


async def test_mtls_with_san_override(
    tls_ads: AdsServer, pki: dict[str, Any], start_client: Start, applied: Applied
) -> None:
    # The URL says 127.0.0.1; the certificate says xds.example.test: only the SAN override fits.
    client = await start_client(xds_settings(tls_ads.port, **tls_env(pki)))
    async with asyncio.timeout(WAIT_SECONDS):
        config = await client.wait_first_config()
    assert limits(config) == {"edge.path_/api": (2, "MINUTE")}
    await tls_ads.wait_request(lambda s: s.is_ack)


@pytest.mark.parametrize(
    "change",
    [
        {"CONFIG_GRPC_XDS_SERVER_TLS_SAN": ""},  # 127.0.0.1 is not in the server's certificate
        {"CONFIG_GRPC_XDS_SERVER_TLS_SAN": "other.example.test"},
        {"CONFIG_GRPC_XDS_CLIENT_TLS_CERT": "", "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": ""},  # no mTLS
        {"CONFIG_GRPC_XDS_SERVER_USE_TLS": "false"},
    ],
    ids=["no-san", "wrong-san", "no-client-cert", "plaintext"],
)
async def test_tls_failures_back_off_without_config(
    tls_ads: AdsServer,
    pki: dict[str, Any],
    change: dict[str, str],
    start_client: Start,
    sleeper: FakeSleep,
) -> None:
    client = await start_client(xds_settings(tls_ads.port, **tls_env(pki, **change)))
    await sleeper.wait_calls(1)
    assert client.config is None and tls_ads.requests == []


async def test_unreadable_tls_file_stops_start(pki: dict[str, Any], tmp_path: Path) -> None:
    settings = xds_settings(
        1, **tls_env(pki, CONFIG_GRPC_XDS_SERVER_TLS_CACERT=str(tmp_path / "missing.pem"))
    )
    client = XdsConfigClient(settings)
    with pytest.raises(SettingsError, match="CONFIG_GRPC_XDS_SERVER_TLS_CACERT: cannot read"):
        await client.start(Applied(MemoryStats()))
    await client.close()


async def test_client_cert_without_key_is_a_settings_error(pki: dict[str, Any]) -> None:
    settings = xds_settings(1, **tls_env(pki, CONFIG_GRPC_XDS_CLIENT_TLS_KEY=""))
    client = XdsConfigClient(settings)
    with pytest.raises(SettingsError, match="must be set together"):
        await client.start(Applied(MemoryStats()))
    await client.close()


# -- end to end: a request through the real gRPC service ---------------------------------------------


async def test_service_limits_change_when_the_control_plane_pushes(
    ads: AdsServer, start_client: Start, applied: Applied, clock: FakeClock
) -> None:
    store = MemoryStore(clock)
    stats = MemoryStats()
    limiter = Limiter(
        store=store,
        stats=stats,
        options=LimiterOptions(expiration_jitter_max_seconds=0),
        clock=clock,
    )
    service = RateLimitService(limiter, lambda: applied.latest, stats)
    server = await start_grpc_server(
        service,
        Settings.from_env({"GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0", "USE_STATSD": "false"}),
    )
    await ads.set_snapshot("v1", [BASIC])  # 2 per minute
    await start_client(xds_settings(ads.port))
    await applied.wait_for(lambda c: True)

    request = rls_pb2.RateLimitRequest(
        domain="edge",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="path", value="/api")]
            )
        ],
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            codes = [(await stub.ShouldRateLimit(request)).overall_code for _ in range(3)]
            ok, over = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
            assert codes == [ok, ok, over]

            await ads.set_snapshot(
                "v2", [rate_limit_config("basic", "edge", rule("path", "/api", per_unit=5))]
            )
            await applied.wait_for(lambda c: limits(c)["edge.path_/api"][0] == 5)
            response = await stub.ShouldRateLimit(request)  # the 4th hit this minute
            assert response.overall_code == ok
            status = response.statuses[0]
            assert status.current_limit.requests_per_unit == 5
            assert status.limit_remaining == 1
    finally:
        await server.stop(None)
        await store.close()


# -- resources are loaded exactly like files -------------------------------------------------------


def _any(config: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(config)
    return packed


D = rls_conf_pb2.RateLimitDescriptor
P = rls_conf_pb2.RateLimitPolicy
R = rls_conf_pb2.RateLimitReplace


@pytest.mark.parametrize(
    ("descriptors", "domain", "message", "yaml_text"),
    [
        ([], "", "config file cannot have empty domain", "domain: ''\n"),
        ([D(key="")], "d", "descriptor has empty key (descriptors[0])",
         "domain: d\ndescriptors: [{key: ''}]\n"),
        ([D(key="k", value="v"), D(key="k", value="v")], "d",
         "duplicate descriptor composite key 'd.k_v' (descriptors[1])",
         "domain: d\ndescriptors: [{key: k, value: v}, {key: k, value: v}]\n"),
        ([D(key="k", rate_limit=P(requests_per_unit=1))], "d",
         "invalid rate limit unit 'UNKNOWN' (descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: k, rate_limit: {unit: UNKNOWN, requests_per_unit: 1}}]\n"),
        ([D(key="k", rate_limit=P(unit=unnamed_unit(99)))], "d",
         "invalid rate limit unit '99' (descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: k, rate_limit: {unit: '99'}}]\n"),
        ([D(key="k", rate_limit=P(unit=MINUTE, unlimited=True))], "d",
         "should not specify rate limit unit when unlimited (descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, unlimited: true}}]\n"),
        ([D(key="k", rate_limit=P(unit=MINUTE, replaces=[R(name="")]))], "d",
         "should not have an empty replaces entry (descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, replaces: [{name: ''}]}}]\n"),
        ([D(key="k", rate_limit=P(unit=MINUTE, name="n", replaces=[R(name="n")]))], "d",
         "replaces should not contain name of same descriptor (descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: k, rate_limit: {unit: minute, name: n, replaces: [{name: n}]}}]\n"),
        ([D(key="a", descriptors=[D(key="b", rate_limit=P(unit=unnamed_unit(12)))])], "d",
         "invalid rate limit unit '12' (descriptors[0].descriptors[0].rate_limit)",
         "domain: d\ndescriptors: [{key: a, descriptors: [{key: b, rate_limit: {unit: '12'}}]}]\n"),
    ],
    ids=["empty-domain", "empty-key", "duplicate-key", "unknown-unit", "unnamed-unit",
         "unlimited-with-unit", "empty-replaces", "replaces-self", "nested"],
)
def test_validation_errors_are_the_file_loaders(
    descriptors: list[Any], domain: str, message: str, yaml_text: str
) -> None:
    resource = _any(rls_conf_pb2.RateLimitConfig(name="cfg", domain=domain, descriptors=descriptors))
    with pytest.raises(ConfigError) as from_xds:
        load_resources([resource])
    assert str(from_xds.value) == f"cfg: {message}"
    # The same rules as a file fail with the same text (the file's error also names a line).
    with pytest.raises(ConfigError) as from_file:
        load_config([ConfigFile("cfg", yaml_text)])
    reference_text = message.rsplit(" (", 1)[0] if message.endswith(")") else message
    assert str(from_file.value).startswith(f"cfg: {reference_text}")


def test_every_field_reaches_the_rule() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"team": "payments", "tier": 2, "tags": ["a", "b"], "on": True})
    config = rls_conf_pb2.RateLimitConfig(
        name="all",
        domain="full",
        descriptors=[
            D(key="zip", value="0123", rate_limit=P(unit=WEEK, requests_per_unit=9,
                                                     name="zip", replaces=[R(name="other")]),
              shadow_mode=True, detailed_metric=True, quota_mode=True, metadata=metadata),
            D(key="free", rate_limit=P(unlimited=True)),
            D(key="none"),  # no rate_limit: an explicit "no limit" node
            D(key="outer", descriptors=[D(key="inner", value="yes",
                                           rate_limit=P(unit=DAY))]),
        ],
    )
    loaded = load_resources([_any(config)])
    root = loaded.domains["full"]
    zip_rule = root.children["zip_0123"].rule
    assert zip_rule is not None
    assert (zip_rule.requests_per_unit, zip_rule.unit, zip_rule.name) == (9, Unit.WEEK, "zip")
    assert zip_rule.replaces == frozenset({"other"})
    assert (zip_rule.shadow_mode, zip_rule.detailed_metric, zip_rule.quota_mode) == (True,) * 3
    assert zip_rule.metadata == {"team": "payments", "tier": 2, "tags": ["a", "b"], "on": True}
    free = root.children["free"].rule
    assert free is not None and free.unlimited and free.unit is Unit.UNKNOWN
    assert root.children["none"].rule is None
    inner = root.children["outer"].children["inner_yes"].rule
    assert inner is not None and inner.stats_key == "full.outer.inner_yes"
    assert loaded.dump() == load_config([ConfigFile("all.yaml", """
domain: full
descriptors:
  - {key: zip, value: "0123", shadow_mode: true, quota_mode: true,
     rate_limit: {unit: week, requests_per_unit: 9}}
  - {key: free, rate_limit: {unlimited: true}}
  - {key: none}
  - key: outer
    descriptors: [{key: inner, value: "yes", rate_limit: {unit: day}}]
""")]).dump()


def test_an_empty_snapshot_is_an_empty_config() -> None:
    assert load_resources([]).domains == {}


def test_undecodable_resource_is_an_error() -> None:
    broken = any_pb2.Any(type_url=TYPE_URL, value=b"\x0a\xff")
    with pytest.raises(ConfigError, match="xDS resource 0: cannot decode RateLimitConfig"):
        load_resources([broken])


def test_unnamed_resource_is_reported_by_position() -> None:
    resource = _any(rls_conf_pb2.RateLimitConfig(domain=""))
    with pytest.raises(ConfigError, match=r"^<xDS resource 0>: config file cannot have empty domain$"):
        load_resources([resource])


# -- our discovery protos are Envoy's ------------------------------------------------------------------

OURS = [
    discovery_pb2.DiscoveryRequest.DESCRIPTOR,
    discovery_pb2.DiscoveryResponse.DESCRIPTOR,
    status_pb2.Status.DESCRIPTOR,
    base_pb2.Node.DESCRIPTOR,
]
# Envoy's fields we leave out on purpose (we never send or read them).
OMITTED = {
    "envoy.service.discovery.v3.DiscoveryRequest": {"7"},  # resource_locators
    "envoy.service.discovery.v3.DiscoveryResponse": {"7"},  # resource_errors
    "envoy.config.core.v3.Node": {"8", "9", "11", "12"},
}
PEER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from support.proto_peer import describe, method_paths
from envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from google.protobuf import descriptor_pool
pool = descriptor_pool.Default()
roots = [pool.FindMessageTypeByName(name) for name in json.loads(sys.argv[2])]
print(json.dumps({"descriptors": describe(roots), "methods": method_paths(ads_pb2.DESCRIPTOR)}))
"""


def test_discovery_protos_match_xds_protos() -> None:
    # xds-protos registers the same names as our generated code: it runs in its own process.
    names = [d.full_name for d in OURS]
    result = subprocess.run(
        [sys.executable, "-c", PEER, str(TESTS), json.dumps(names)],
        capture_output=True, text=True, check=False, env=peer_env(),
    )
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout)
    ours = describe(OURS)
    for name, entry in ours.items():
        if "enum" in entry:
            assert entry == theirs["descriptors"][name], name
            continue
        their_fields = theirs["descriptors"][name]["fields"]
        for number, field in entry["fields"].items():
            assert their_fields.get(number) == field, f"{name} field {number}"
        missing = set(their_fields) - set(entry["fields"])
        assert missing == OMITTED.get(name, set()), name
    ours_methods = method_paths(ads_pb2.DESCRIPTOR)
    assert ours_methods == [
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
    ]
    assert set(ours_methods) <= set(theirs["methods"])  # Envoy's also has the delta variant
