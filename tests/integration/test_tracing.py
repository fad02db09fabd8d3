"""TRACING_ENABLED: a span per ShouldRateLimit and per backend round trip, parented from W3C
``traceparent`` and from B3 gRPC metadata; no OpenTelemetry at all when tracing is off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.service_env import base_env, write_rules
from test_grpc import RULES as GRPC_RULES
from test_grpc import descriptor

from ratelimit_svc.app import App
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.tracing import Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
METHOD = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
REQUEST = rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "t"))])


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


async def start(tmp_path: Path, exporter: InMemorySpanExporter, **extra: str) -> App:
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        TRACING_ENABLED="true",
        TRACING_SERVICE_NAME="rls",
        TRACING_SERVICE_NAMESPACE="edge",
        TRACING_SERVICE_INSTANCE_ID="pod-1",
        **extra,
    )
    return App(Settings.from_env(env), span_exporter=exporter)


@pytest.fixture
async def app(tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[App]:
    async with await start(tmp_path, exporter) as running:
        yield running


async def call(
    app: App, metadata: tuple[tuple[str, str], ...] = (), request: rls_pb2.RateLimitRequest = REQUEST
) -> None:
    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
        await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, metadata=metadata)


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def assert_request_and_backend_spans(exporter: InMemorySpanExporter, trace_id: str, parent_id: str) -> None:
    spans = by_name(exporter)
    server, backend = spans[METHOD], spans["memory increment"]
    assert server.kind is SpanKind.SERVER
    assert server.context is not None and server.parent is not None
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent_id
    assert server.parent.is_remote
    assert server.attributes is not None
    assert server.attributes["rpc.method"] == "ShouldRateLimit"
    assert server.attributes["ratelimit.domain"] == "basic"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert backend.kind is SpanKind.CLIENT
    assert backend.parent is not None and backend.parent.span_id == server.context.span_id
    assert backend.context is not None and backend.context.trace_id == server.context.trace_id


async def test_span_parented_from_traceparent(app: App, exporter: InMemorySpanExporter) -> None:
    await call(app, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
    assert_request_and_backend_spans(exporter, TRACE_ID, PARENT_ID)


async def test_span_parented_from_b3_headers(app: App, exporter: InMemorySpanExporter) -> None:
    await call(app, (("x-b3-traceid", TRACE_ID), ("x-b3-spanid", PARENT_ID), ("x-b3-sampled", "1")))
    assert_request_and_backend_spans(exporter, TRACE_ID, PARENT_ID)


async def test_span_parented_from_b3_single_header(app: App, exporter: InMemorySpanExporter) -> None:
    await call(app, (("b3", f"{TRACE_ID}-{PARENT_ID}-1"),))
    assert_request_and_backend_spans(exporter, TRACE_ID, PARENT_ID)


async def test_without_a_caller_trace_a_new_trace_starts(app: App, exporter: InMemorySpanExporter) -> None:
    await call(app)
    server = by_name(exporter)[METHOD]
    assert server.parent is None
    resource = dict(server.resource.attributes)
    assert resource["service.name"] == "rls"
    assert resource["service.namespace"] == "edge"
    assert resource["service.instance.id"] == "pod-1"


async def test_failed_call_span_has_error_status(app: App, exporter: InMemorySpanExporter) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await call(app, request=rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("a", "b"))]))
    server = by_name(exporter)[METHOD]
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "memory increment" not in by_name(exporter)


async def test_health_checks_are_not_traced(app: App, exporter: InMemorySpanExporter) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert exporter.get_finished_spans() == ()


async def test_sampling_rate_zero_still_follows_a_sampled_caller(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    async with await start(tmp_path, exporter, TRACING_SAMPLING_RATE="0") as app:
        await call(app)
        assert exporter.get_finished_spans() == ()
        await call(app, (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),))
        assert METHOD in by_name(exporter)


@pytest.mark.parametrize(
    ("protocol", "module"),
    [("http", "opentelemetry.exporter.otlp.proto.http"), ("grpc", "opentelemetry.exporter.otlp.proto.grpc")],
)
async def test_exporter_follows_the_protocol_setting(protocol: str, module: str) -> None:
    tracing = Tracing(Settings.from_env({"TRACING_ENABLED": "true", "TRACING_EXPORTER_PROTOCOL": protocol}).tracing, "memory")
    try:
        processors = tracing.provider._active_span_processor._span_processors
        exporter = processors[0].span_exporter  # type: ignore[attr-defined]
        assert type(exporter).__module__.startswith(module)
    finally:
        await tracing.shutdown()


def test_no_opentelemetry_import_when_tracing_is_off(tmp_path: Path) -> None:
    """The zero-cost promise: a service without TRACING_ENABLED never loads OpenTelemetry."""
    env = base_env(**write_rules(tmp_path, GRPC_RULES))
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from ratelimit_svc.app import App
        from ratelimit_svc.settings.model import Settings

        async def main():
            async with App(Settings.from_env({env!r})) as app:
                assert app.tracing is None

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
