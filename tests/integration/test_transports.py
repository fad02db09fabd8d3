"""The gRPC port on both transports (docs/transports.md): the same calls, answered the same way.

Every test runs the real service process (``python -m ratelimit_svc``) with GRPC_SERVER=pyvoy
(Envoy with the service embedded, the default) and GRPC_SERVER=grpcio (grpc.aio), and talks to it
with grpcio, Envoy's own generated stubs, h2load or a raw HTTP/2 client (tests/h2_client.py) for
what those never send.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.fault_proxy import DelayProxy
from support.h2_client import H2Connection, grpc_frame, grpc_headers
from support.redis_fixtures import RedisServer
from support.service_env import ServiceProcess, base_env, config_dir_env
from support.xds_protos import peer_env

from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

TRANSPORTS = ["pyvoy", "grpcio"]
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: many
    rate_limit: {unit: hour, requests_per_unit: 1000000}
"""


def request(key: str = "key1", value: str = "a") -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(
        domain="basic",
        descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[{"key": key, "value": value}])],
    )


async def start(transport: str, tmp_path: Path, rules: str | None = RULES, **env: str) -> ServiceProcess:
    """The service on ``transport``, checked to really run on it (no silent fallback)."""
    runtime, _ = config_dir_env(tmp_path, rules)
    service = await ServiceProcess.start(base_env(**{**runtime, "GRPC_SERVER": transport, **env}))
    listening = next(line for line in service.lines if "Listening for gRPC" in line)
    if ("ratelimit_svc.servers.pyvoy" in listening) != (transport == "pyvoy"):
        await service.kill()  # not left running behind the failure
        raise AssertionError(service.lines)
    return service


async def stop(service: ServiceProcess) -> str:
    """SIGTERM, a clean exit, and the whole log."""
    service.process.send_signal(signal.SIGTERM)
    code = await service.wait()
    log = "".join(service.lines)
    assert code == 0, log
    assert "Traceback" not in log, log
    return log


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def service(transport: str, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    running = await start(transport, tmp_path)
    try:
        yield running
        await stop(running)
    finally:
        await running.kill()


def target(service: ServiceProcess) -> str:
    return f"127.0.0.1:{service.ports['gRPC']}"


async def test_ok_then_over_limit(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service)) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        codes = [(await stub.ShouldRateLimit(request(), timeout=10)).overall_code for _ in range(3)]
    ok, over = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
    assert codes == [ok, ok, over]


async def test_envoy_generated_stubs(service: ServiceProcess) -> None:
    """A client built from xds-protos (Envoy's official generated code), as Envoy would call."""
    script = f"""
import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
stub = rls_pb2_grpc.RateLimitServiceStub(grpc.insecure_channel({target(service)!r}))
request = rls_pb2.RateLimitRequest(domain="basic", descriptors=[
    ratelimit_pb2.RateLimitDescriptor(entries=[{{"key": "key1", "value": "stubs"}}])])
for _ in range(3):
    answer = stub.ShouldRateLimit(request, timeout=10)
    print(rls_pb2.RateLimitResponse.Code.Name(answer.overall_code), answer.statuses[0].limit_remaining)
"""
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], env=peer_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["OK 1", "OK 0", "OVER_LIMIT 0"]


async def test_request_errors_are_invalid_argument(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service)) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain=""), timeout=10)
        raw = channel.unary_unary(METHOD)
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await raw(b"\x0a\xff\xff\xff", timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain" in (empty.value.details() or "")
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed RateLimitRequest" in (garbage.value.details() or "")


async def test_no_config_is_unavailable(transport: str, tmp_path: Path) -> None:
    service = await start(transport, tmp_path, RUNTIME_SUBDIRECTORY="")
    try:
        async with grpc.aio.insecure_channel(target(service)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request(), timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        await stop(service)
    finally:
        await service.kill()


async def test_unknown_method_is_unimplemented(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/Nope")(b"", timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_check_and_watch(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "ratelimit"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service="ratelimit"))
        first = await asyncio.wait_for(watch.read(), 10)
        watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_large_request_over_many_data_frames(service: ServiceProcess) -> None:
    """60 kB: several 16 kB DATA frames, so the server reassembles the message from chunks."""
    async with grpc.aio.insecure_channel(target(service)) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answer = await stub.ShouldRateLimit(request("many", "v" * 60_000), timeout=10)
    assert answer.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("cuts", [(2,), (5,), (3, 9), (7, 8, 9)])
async def test_message_split_anywhere_across_data_frames(service: ServiceProcess, cuts: tuple[int, ...]) -> None:
    """The length prefix or the message cut at any byte, each piece a DATA frame of its own."""
    data = grpc_frame(request("many", "split").SerializeToString())
    pieces = [data[a:b] for a, b in zip((0, *cuts), (*cuts, len(data)), strict=True)]
    connection = await H2Connection.open(service.ports["gRPC"])
    try:
        answer = await connection.call(grpc_headers(METHOD), pieces, pause=0.05)
    finally:
        await connection.close()
    assert answer.headers[":status"] == "200"
    assert answer.grpc_status == 0, answer
    assert rls_pb2.RateLimitResponse.FromString(answer.data[5:]).overall_code == rls_pb2.RateLimitResponse.OK


async def test_gzip_compressed_request(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service), compression=grpc.Compression.Gzip) as channel:
        answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request("many"), timeout=10)
    assert answer.overall_code == rls_pb2.RateLimitResponse.OK
    # and by hand, so the compressed flag is certainly set
    body = grpc_frame(gzip.compress(request("many").SerializeToString()), compressed=True)
    connection = await H2Connection.open(service.ports["gRPC"])
    try:
        answer2 = await connection.call(grpc_headers(METHOD, ("grpc-encoding", "gzip")), [body])
    finally:
        await connection.close()
    assert answer2.grpc_status == 0, answer2


async def test_unsupported_encoding_is_unimplemented(service: ServiceProcess, transport: str) -> None:
    body = grpc_frame(b"not really compressed", compressed=True)
    connection = await H2Connection.open(service.ports["gRPC"])
    try:
        answer = await connection.call(grpc_headers(METHOD, ("grpc-encoding", "snappy")), [body])
    finally:
        await connection.close()
    if transport == "pyvoy":  # as the gRPC protocol says, with the encodings it accepts
        assert answer.grpc_status == 12, answer  # UNIMPLEMENTED
        assert answer.headers.get("grpc-accept-encoding") == "identity,gzip", answer
    else:  # grpc-core refuses it as unparsable metadata (docs/transports.md)
        assert answer.grpc_status == 13, answer  # INTERNAL


async def test_error_is_trailers_only_with_a_percent_encoded_message(service: ServiceProcess, transport: str) -> None:
    """An error answer is one HEADERS frame (no DATA); grpc-message is percent-encoded UTF-8."""
    path = "/envoy.service.ratelimit.v3.RateLimitService/N%C3%A9%25"  # "Né%", percent-encoded
    connection = await H2Connection.open(service.ports["gRPC"])
    try:
        answer = await connection.call(grpc_headers(path), [grpc_frame(b"")])
    finally:
        await connection.close()
    assert answer.grpc_status == 12, answer  # UNIMPLEMENTED
    assert answer.data == b"" and answer.trailers == {}, answer
    assert "grpc-status" in answer.headers  # trailers-only: the status came with the headers
    assert all(0x20 <= ord(c) < 0x7F for c in answer.grpc_message), answer
    if transport == "pyvoy":  # grpcio's message does not name the method
        assert answer.grpc_message.endswith("/N%C3%A9%25"), answer
    value_too_long = rls_pb2.RateLimitRequest(domain="basic", descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "k", "value": "x" * 70_000}])])  # fmt: skip
    async with grpc.aio.insecure_channel(target(service)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(value_too_long, timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MAX_VALUE_BYTES" in (failure.value.details() or "")


async def test_wrong_content_type_is_refused(service: ServiceProcess) -> None:
    connection = await H2Connection.open(service.ports["gRPC"])
    try:
        answer = await connection.call(
            grpc_headers(METHOD, content_type="application/json"), [b'{"domain": "basic"}']
        )
    finally:
        await connection.close()
    # gRPC servers answer a non-gRPC content-type with HTTP 415 or a gRPC error, never a call.
    assert answer.headers[":status"] == "415" or answer.grpc_status not in (None, 0), answer
    assert answer.data == b"" or answer.headers[":status"] != "200"


async def test_http1_is_not_served(service: ServiceProcess) -> None:
    """gRPC is HTTP/2 only: an HTTP/1.1 request gets no HTTP/1.1 answer, as from grpcio."""
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["gRPC"])
    writer.write(f"POST {METHOD} HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert not answer.startswith(b"HTTP/1.1 200"), answer


async def test_max_message_size(transport: str, tmp_path: Path) -> None:
    service = await start(transport, tmp_path, MAX_REQUEST_BYTES="2048")
    try:
        async with grpc.aio.insecure_channel(target(service)) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.ShouldRateLimit(request("many", "v" * 4096), timeout=10)
            small = await stub.ShouldRateLimit(request("many", "v" * 100), timeout=10)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert small.overall_code == rls_pb2.RateLimitResponse.OK
        await stop(service)
    finally:
        await service.kill()


async def test_grpc_timeout_is_honoured(transport: str, tmp_path: Path, redis_db: RedisServer) -> None:
    """A backend slower than the caller's grpc-timeout: the server answers DEADLINE_EXCEEDED
    itself (the raw client sets no deadline of its own) instead of waiting for the backend."""
    proxy = DelayProxy(redis_db.port)
    await proxy.start()
    service = await start(
        transport, tmp_path, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp",
        REDIS_URL=f"127.0.0.1:{proxy.port}", REDIS_OP_TIMEOUT="30s", WORKERS="1",
    )  # fmt: skip
    try:
        proxy.delay = 20.0
        connection = await H2Connection.open(service.ports["gRPC"])
        try:
            answer = await connection.call(
                grpc_headers(METHOD, ("grpc-timeout", "300m")), [grpc_frame(request("many").SerializeToString())]
            )
        finally:
            await connection.close()
        assert answer.grpc_status == 4 or answer.reset, answer  # DEADLINE_EXCEEDED
        proxy.delay = 0.0
    finally:
        await service.kill()
        await proxy.close()


async def test_unix_socket(transport: str, tmp_path: Path) -> None:
    path = tmp_path / "grpc.sock"
    runtime, _ = config_dir_env(tmp_path, RULES)
    service = await ServiceProcess.spawn(base_env(**runtime, GRPC_SERVER=transport, GRPC_UDS=str(path)))
    try:
        await service.wait_for_line("Listening for gRPC")
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request(), timeout=10)
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK
        await stop(service)
    finally:
        await service.kill()


async def test_max_connection_age_sends_goaway(transport: str, tmp_path: Path) -> None:
    service = await start(transport, tmp_path, GRPC_MAX_CONNECTION_AGE="1s", GRPC_MAX_CONNECTION_AGE_GRACE="1s")
    try:
        connection = await H2Connection.open(service.ports["gRPC"])
        try:
            answer = await connection.call(grpc_headers(METHOD), [grpc_frame(request("many").SerializeToString())])
            assert answer.grpc_status == 0
            async with asyncio.timeout(30):
                while not connection.goaway.is_set():
                    await connection.read_once()
        finally:
            await connection.close()
        await stop(service)
    finally:
        await service.kill()


async def test_stats_count_calls(service: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(target(service)) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        for _ in range(5):
            await stub.ShouldRateLimit(request("many"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ShouldRateLimit(rls_pb2.RateLimitRequest(domain=""), timeout=10)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{service.ports['debug']}/stats") as page:
        stats = dict(line.split(": ") for line in (await page.text()).splitlines())
    assert stats["ratelimit_server.ShouldRateLimit.total_requests"] == "6"
    assert stats["ratelimit.service.call.should_rate_limit.service_error"] == "1"


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")
async def test_h2load(service: ServiceProcess, tmp_path: Path) -> None:
    body = tmp_path / "request.bin"
    body.write_bytes(grpc_frame(request("many").SerializeToString()))
    result = await asyncio.to_thread(
        subprocess.run,
        ["h2load", "-n", "2000", "-c", "2", "-m", "16", "-d", str(body), "-H", "content-type: application/grpc",
         "-H", "te: trailers", f"http://{target(service)}{METHOD}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "2000 succeeded, 0 failed, 0 errored" in result.stdout, result.stdout
    assert "status codes: 2000 2xx" in result.stdout, result.stdout


async def test_3000_calls_on_one_connection(tmp_path: Path) -> None:
    """One busy Envoy: 3,000 calls in flight at once on one HTTP/2 connection, all answered OK."""
    service = await start("pyvoy", tmp_path)
    try:
        async with grpc.aio.insecure_channel(target(service)) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            await stub.ShouldRateLimit(request("many"), timeout=30)  # connected before the burst
            results = await asyncio.gather(
                *(stub.ShouldRateLimit(request("many", str(n)), timeout=60) for n in range(3000)),
                return_exceptions=True,
            )
        failures = [r for r in results if not isinstance(r, rls_pb2.RateLimitResponse)]
        assert failures == []
        assert all(r.overall_code == rls_pb2.RateLimitResponse.OK for r in results)  # type: ignore[union-attr]
        await stop(service)
    finally:
        await service.kill()


async def test_a_pyvoy_that_cannot_load_falls_back_to_grpcio_with_one_line(tmp_path: Path) -> None:
    """An installed pyvoy package without its Envoy module (shadowed on PYTHONPATH here)."""
    (tmp_path / "shadow" / "pyvoy").mkdir(parents=True)
    (tmp_path / "shadow" / "pyvoy" / "__init__.py").write_text("")
    runtime, _ = config_dir_env(tmp_path, RULES)
    service = await ServiceProcess.start(base_env(**runtime, GRPC_SERVER="pyvoy", PYTHONPATH=str(tmp_path / "shadow")))
    try:
        async with grpc.aio.insecure_channel(target(service)) as channel:
            answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request(), timeout=10)
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK
        log = await stop(service)
    finally:
        await service.kill()
    [line] = [line for line in log.splitlines() if "using grpcio instead" in line]
    assert "GRPC_SERVER=pyvoy: using grpcio instead: pyvoy or its Envoy binary is missing" in line
    assert not any("ratelimit_svc.servers.pyvoy" in line for line in log.splitlines())


async def test_tracing_continues_w3c_and_b3_parents(transport: str, tmp_path: Path) -> None:
    """Spans reach a real OTLP/HTTP endpoint, parented from traceparent and from B3 headers."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    spans: list[object] = []
    arrived = asyncio.Event()

    async def traces(http_request: web.Request) -> web.Response:
        export = trace_service_pb2.ExportTraceServiceRequest.FromString(await http_request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                spans.extend(scope.spans)
        arrived.set()
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    collector = web.Application()
    collector.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(collector)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    service = await start(
        transport, tmp_path, TRACING_ENABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )  # fmt: skip
    w3c_trace, w3c_parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    b3_trace, b3_parent = "463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312"
    try:
        async with grpc.aio.insecure_channel(target(service)) as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            await stub.ShouldRateLimit(request("many"), timeout=10,
                                       metadata=(("traceparent", f"00-{w3c_trace}-{w3c_parent}-01"),))
            await stub.ShouldRateLimit(request("many"), timeout=10, metadata=(
                ("x-b3-traceid", b3_trace), ("x-b3-spanid", b3_parent), ("x-b3-sampled", "1")))
        async with asyncio.timeout(30):
            while sum(1 for s in spans if s.name.endswith("/ShouldRateLimit")) < 2:  # type: ignore[attr-defined]
                arrived.clear()
                await arrived.wait()
        await stop(service)
    finally:
        await service.kill()
        await runner.cleanup()
    parents = {s.trace_id.hex(): s.parent_span_id.hex() for s in spans if s.name.endswith("/ShouldRateLimit")}  # type: ignore[attr-defined]
    assert parents == {w3c_trace: w3c_parent, b3_trace: b3_parent}


def test_unavailable_reason_without_a_shared_libpython(monkeypatch: pytest.MonkeyPatch) -> None:
    import find_libpython

    from ratelimit_svc.servers import pyvoy as pyvoy_server
    from ratelimit_svc.settings.model import Settings

    settings = Settings.from_env({})
    assert pyvoy_server.unavailable_reason(settings) is None
    monkeypatch.setattr(find_libpython, "candidate_paths", lambda: iter(["/nonexistent/libpython3.so"]))
    reason = pyvoy_server.unavailable_reason(settings)
    assert reason is not None and "shared libpython" in reason


def test_the_pyvoy_processes_never_import_grpc() -> None:
    """grpc is the grpcio transport's alone (docs/performance.md, Memory): the modules an embedded
    pyvoy app and its outer process load leave it out, so its ~14 MiB is not paid there."""
    modules = [
        "ratelimit_svc.workers.launch",
        "ratelimit_svc.servers.pyvoy",
        "ratelimit_svc.workers.embedded",
        "ratelimit_svc.workers.roles",
        "ratelimit_svc.app",
        "ratelimit_svc.servers.grpc_asgi",
        "ratelimit_svc.servers.tls",
    ]
    probe = "import importlib, sys\n"
    probe += "".join(f"importlib.import_module({name!r})\n" for name in modules)
    probe += "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))\n"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]", loaded
    control = subprocess.run(
        [sys.executable, "-c", "import ratelimit_svc.servers.grpc_aio, sys; print('grpc' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert control.strip() == "True"  # the probe would see grpc if it were loaded



def test_a_grpc_worker_imports_no_http_server_console_or_config_loader() -> None:
    """docs/performance.md (Memory): the Envoys of WORKERS serve gRPC only, so importing the
    embedded app loads neither aiohttp, the console, nor the config file loader (PyYAML,
    multiprocessing's fork server); the process that serves the operator ports imports them when
    it starts them."""
    heavy = ["aiohttp", "yaml", "ratelimit_svc.servers.console.model", "ratelimit_svc.config.load_process"]
    probe = f"import sys, ratelimit_svc.workers.embedded\nprint([m for m in {heavy!r} if m in sys.modules])\n"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    control = f"import sys, ratelimit_svc.servers.debug, ratelimit_svc.config.source\nprint([m for m in {heavy!r} if m in sys.modules])\n"
    seen = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, check=True).stdout
    assert seen.strip() == repr(heavy)  # the probe would see them if they were loaded

@pytest.mark.parametrize("workers", [1, 2])
async def test_each_envoy_lets_go_of_its_startup_file_pages(workers: int, tmp_path: Path, redis_db: RedisServer) -> None:
    """docs/performance.md (Memory): once serving, every process releases the file pages starting
    touched (workers/resident.py): each Envoy (the lone one, or each of WORKERS) once it listens,
    the outer process or primary once they serve; and Envoy keeps serving from the pages it maps
    again."""
    backend = {"BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis_db.url}
    runtime, _ = config_dir_env(tmp_path, RULES)
    env = {**runtime, **backend, "GRPC_SERVER": "pyvoy", "LOG_LEVEL": "DEBUG", "WORKERS": str(workers)}
    service = await ServiceProcess.start(base_env(**env))
    try:
        def released() -> list[int]:
            found = (re.search(r"released (\d+) kB of resident file pages", line) for line in service.lines)
            return sorted((int(match[1]) for match in found if match), reverse=True)

        while len(released()) < workers + 1:
            await service.wait_for_line("resident file pages")
        assert all(kb > 10_000 for kb in released()[:workers]), released()  # Envoy's binary is 100 MB
        async with grpc.aio.insecure_channel(target(service)) as channel:
            answer = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request(), timeout=10)
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK
        await stop(service)
    finally:
        await service.kill()
