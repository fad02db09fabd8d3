"""The running service through a real grpc.aio channel (docs/operations.md (Errors)), and its process life."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.clock import FakeClock
from support.service_env import base_env, write_rules

from ratelimit_svc.app import App
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

ROOT = Path(__file__).resolve().parents[2]
RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: meta
    metadata: {team: a}
    rate_limit: {unit: minute, requests_per_unit: 5, name: m}
"""


def descriptor(*entries: tuple[str, str]) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor()
    for key, value in entries:
        d.entries.add(key=key, value=value)
    return d


@pytest.fixture
async def app(tmp_path: Path, clock: FakeClock) -> AsyncIterator[App]:
    env = base_env(
        **write_rules(tmp_path, RULES),
        LIMIT_RESPONSE_HEADERS_ENABLED="true",
        RESPONSE_DYNAMIC_METADATA="true",
    )
    async with App(Settings.from_env(env), clock=clock) as running:
        yield running


@pytest.fixture
async def stub(app: App) -> AsyncIterator[rls_pb2_grpc.RateLimitServiceStub]:
    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
        yield rls_pb2_grpc.RateLimitServiceStub(channel)


async def test_ok_then_over_limit_on_the_wire(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    request = rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "a"))])
    first = await stub.ShouldRateLimit(request)
    assert first.overall_code == rls_pb2.RateLimitResponse.OK
    status = first.statuses[0]
    assert status.code == rls_pb2.RateLimitResponse.OK
    assert status.current_limit.requests_per_unit == 2
    assert status.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.MINUTE
    assert status.limit_remaining == 1
    assert status.duration_until_reset.seconds == 35
    await stub.ShouldRateLimit(request)
    third = await stub.ShouldRateLimit(request)
    assert third.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert third.statuses[0].code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert third.statuses[0].limit_remaining == 0
    headers = [(h.key, h.value) for h in third.response_headers_to_add]
    assert headers == [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "0"), ("RateLimit-Reset", "35")]


async def test_rule_name_metadata_and_unmatched_status(stub: rls_pb2_grpc.RateLimitServiceStub) -> None:
    request = rls_pb2.RateLimitRequest(
        domain="basic", descriptors=[descriptor(("meta", "x")), descriptor(("nothing", "y"))]
    )
    response = await stub.ShouldRateLimit(request)
    assert response.statuses[0].current_limit.name == "m"
    assert not response.statuses[1].HasField("current_limit")
    assert response.statuses[1].code == rls_pb2.RateLimitResponse.OK
    assert response.dynamic_metadata["domain"] == "basic"
    assert response.dynamic_metadata["metadata"]["team"] == "a"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("a", "b"))]), "rate limit domain must not be empty"),
        (rls_pb2.RateLimitRequest(domain="basic"), "rate limit descriptor list must not be empty"),
    ],
    ids=["empty-domain", "no-descriptors"],
)
async def test_request_errors_are_invalid_argument(
    stub: rls_pb2_grpc.RateLimitServiceStub, request_: rls_pb2.RateLimitRequest, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ShouldRateLimit(request_)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == message


async def test_no_config_is_unavailable(tmp_path: Path) -> None:
    env = base_env(RUNTIME_ROOT=str(tmp_path), RUNTIME_SUBDIRECTORY="")
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ShouldRateLimit(
                    rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("a", "b"))])
                )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "no rate limit configuration loaded"


async def test_health_service_serving(app: App) -> None:
    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ratelimit"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_unix_socket_listener(tmp_path: Path) -> None:
    sock = tmp_path / "rls.sock"
    env = base_env(**write_rules(tmp_path, RULES), GRPC_UDS=str(sock))
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None and app.grpc.address == f"unix:{sock}"
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            response = await stub.ShouldRateLimit(
                rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "u"))])
            )
    assert response.statuses[0].current_limit.requests_per_unit == 2


async def test_concurrent_requests_admit_exactly_the_limit(tmp_path: Path) -> None:
    rules = "domain: c\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 37}\n"
    async with App(Settings.from_env(base_env(**write_rules(tmp_path, rules)))) as app:
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(domain="c", descriptors=[descriptor(("k", "v"))])
            answers = await asyncio.gather(*(stub.ShouldRateLimit(request) for _ in range(150)))
    ok = sum(a.overall_code == rls_pb2.RateLimitResponse.OK for a in answers)
    assert ok == 37


# -- the process: console script, python -m, signals, bad settings ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(
        argv, env=full_env, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "Listening for gRPC on" in line:
            return proc, lines
    proc.wait(10)
    proc.stderr.close()
    raise AssertionError("service did not start:\n" + "".join(lines))


@pytest.fixture
def service_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    port = free_port()
    env = base_env(**write_rules(tmp_path, RULES), GRPC_PORT=str(port), LOG_LEVEL="INFO")
    argv = request.param
    proc, lines = start_process(argv, env)
    try:
        yield proc, port, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def ask(port: int) -> rls_pb2.RateLimitResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        return stub.ShouldRateLimit(
            rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "p"))]),
            timeout=10,
        )


SCRIPT = str(Path(sys.executable).parent / "ratelimit")


@pytest.mark.parametrize(
    ("service_process", "sig"),
    [
        ([sys.executable, "-m", "ratelimit_svc"], signal.SIGTERM),
        ([sys.executable, "-m", "ratelimit_svc"], signal.SIGINT),
        ([SCRIPT], signal.SIGTERM),
    ],
    indirect=["service_process"],
    ids=["python-m-sigterm", "python-m-sigint", "console-script-sigterm"],
)
def test_process_serves_and_stops_cleanly(service_process: tuple[subprocess.Popen[str], int, list[str]], sig: signal.Signals) -> None:
    proc, port, lines = service_process
    assert any(f"Listening for gRPC on '127.0.0.1:{port}'" in line for line in lines)
    assert ask(port).statuses[0].current_limit.requests_per_unit == 2
    proc.send_signal(sig)
    assert proc.wait(15) == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REDIS_POOL_SIZE", "lots"), ("USE_STATSD", "yes please"), ("GRPC_MAX_CONNECTION_AGE", "5 minutes")],
)
def test_invalid_setting_stops_startup_with_one_line(variable: str, value: str) -> None:
    env = {**os.environ, **base_env(), variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "ratelimit_svc"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and value in lines[0]


def test_make_run_answers_with_the_example_config() -> None:
    port = free_port()
    env = {"GRPC_PORT": str(port), "GRPC_HOST": "127.0.0.1", "PORT": "0", "DEBUG_PORT": "0", "PYTHON": sys.executable}
    proc, _ = start_process(["make", "--no-print-directory", "run"], env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            response = stub.ShouldRateLimit(
                rls_pb2.RateLimitRequest(
                    domain="mydomain",
                    descriptors=[
                        descriptor(("ratelimitkey", "client"), ("path", "/foo")),
                        descriptor(("database", "default")),
                    ],
                ),
                timeout=10,
            )
        limits = [(s.current_limit.requests_per_unit, s.current_limit.unit) for s in response.statuses]
        assert limits == [(2, rls_pb2.RateLimitResponse.RateLimit.SECOND), (500, rls_pb2.RateLimitResponse.RateLimit.SECOND)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("transport", ["pyvoy", "grpcio"])
def test_duplicate_signal_is_one_signal_and_a_later_second_forces_exit(tmp_path: Path, transport: str) -> None:
    import time

    env = base_env(**write_rules(tmp_path, RULES), GRPC_PORT=str(free_port()), SHUTDOWN_DRAIN_SECONDS="4", GRPC_SERVER=transport)
    proc, lines = start_process([sys.executable, "-m", "ratelimit_svc"], env)
    try:
        assert proc.stderr is not None
        while not any("Listening for debug" in line for line in lines):  # the last one up...
            lines.append(proc.stderr.readline())
        time.sleep(1.0)  # ...then the config watcher: a signal during startup cancels it instead
        # A process-group kill plus a parent forwarding it: the same signal twice at once.
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None  # still draining, not forced out
        proc.send_signal(signal.SIGINT)  # a deliberate second signal, later
        started = time.monotonic()
        assert proc.wait(10) == 1
        assert time.monotonic() - started < 2.0  # forced: did not sit out the 4 s drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
