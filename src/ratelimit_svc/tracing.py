"""OpenTelemetry tracing (TRACING_ENABLED), imported only when it is on: a span per ShouldRateLimit
call continuing the caller's W3C or B3 trace, one per backend round trip, exported over OTLP; the
provider belongs to the ``Tracing`` object the app owns (docs/observability.md (Tracing)).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ratelimit_svc.limiter.algorithms import Step, StepResult
from ratelimit_svc.limiter.store import CounterStore, Increment
from ratelimit_svc.settings.model import TracingSettings

SERVICE_PREFIX = "/envoy.service.ratelimit.v3.RateLimitService/"


def _exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


class Tracing:
    """The tracer provider, the propagator, and the hooks that create spans."""

    def __init__(
        self, settings: TracingSettings, backend: str, exporter: SpanExporter | None = None
    ) -> None:
        attributes = {"service.name": settings.service_name}
        if settings.service_namespace:
            attributes["service.namespace"] = settings.service_namespace
        if settings.service_instance_id:
            attributes["service.instance.id"] = settings.service_instance_id
        self.provider = TracerProvider(
            resource=Resource.create(attributes),
            sampler=ParentBased(TraceIdRatioBased(settings.sampling_rate)),
        )
        if exporter is None:
            processor: Any = BatchSpanProcessor(_exporter(settings.exporter_protocol))
        else:
            processor = SimpleSpanProcessor(exporter)  # given by tests: spans visible at once
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("ratelimit_svc")
        self.propagator = CompositePropagator(
            [TraceContextTextMapPropagator(), W3CBaggagePropagator(), B3MultiFormat()]
        )
        self.backend = backend

    def extract(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Context:
        """The caller's trace context from gRPC metadata (empty when there is none)."""
        carrier = {
            key.lower(): value for key, value in metadata or () if isinstance(value, str)
        }
        return self.propagator.extract(carrier)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _TracingInterceptor(self)

    def wrap_store(self, store: CounterStore) -> CounterStore:
        return TracedStore(store, self)

    async def shutdown(self) -> None:
        # Flushing the batch processor blocks on the network: keep the event loop free.
        await asyncio.to_thread(self.provider.shutdown)


class _TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(SERVICE_PREFIX):
            return handler
        return handler._replace(
            unary_unary=self._traced(handler.unary_unary, method, handler_call_details)
        )

    def _traced(self, behaviour: Callable[..., Any], method: str, details: Any) -> Any:
        tracing = self.tracing
        service, _, name = method[1:].partition("/")

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            parent = tracing.extract(details.invocation_metadata)
            with tracing.tracer.start_as_current_span(
                method[1:],
                context=parent,
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": name,
                    "ratelimit.domain": getattr(request, "domain", ""),
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    response = await behaviour(request, context)
                except BaseException:
                    code = context.code()
                    status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
                    span.set_attribute("rpc.grpc.status_code", status.value[0])
                    span.set_status(Status(StatusCode.ERROR, context.details() or status.name))
                    raise
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
                return response

        return traced


class TracedStore:
    """A ``CounterStore`` whose every round trip is a CLIENT span under the request's span."""

    def __init__(self, store: CounterStore, tracing: Tracing) -> None:
        self.store = store
        self._tracer = tracing.tracer
        self._system = tracing.backend

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        with self._tracer.start_as_current_span(
            f"{self._system} increment",
            kind=SpanKind.CLIENT,
            attributes={"db.system": self._system, "ratelimit.keys": len(increments)},
        ):
            return await self.store.increment(increments)

    async def get(self, keys: Sequence[str]) -> list[int]:
        with self._tracer.start_as_current_span(
            f"{self._system} get",
            kind=SpanKind.CLIENT,
            attributes={"db.system": self._system, "ratelimit.keys": len(keys)},
        ):
            return await self.store.get(keys)

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        with self._tracer.start_as_current_span(
            f"{self._system} {'refund' if refund else 'settle'}",
            kind=SpanKind.CLIENT,
            attributes={"db.system": self._system, "ratelimit.keys": len(steps)},
        ):
            return await self.store.settle(steps, now, refund=refund)

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        await self.store.close()
