"""OpenTelemetry tracing (TRACING_ENABLED), imported only when it is on: a span per ShouldRateLimit
call continuing the caller's W3C or B3 trace, one per backend round trip, exported over OTLP; the
provider belongs to the ``Tracing`` object the app owns (docs/observability.md (Tracing)).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
            key.lower(): value if isinstance(value, str) else value.decode("latin-1")
            for key, value in metadata or ()
            if not key.endswith("-bin")
        }
        return self.propagator.extract(carrier)

    @contextlib.contextmanager
    def server_span(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], domain: str
    ) -> Iterator[Callable[[int, str], None]]:
        """The SERVER span of one call, current while it runs (the store's spans are its
        children); the caller reports the gRPC outcome with the function yielded."""
        service, _, name = method[1:].partition("/")
        with self.tracer.start_as_current_span(
            method[1:],
            context=self.extract(metadata),
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "ratelimit.domain": domain,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            def outcome(code: int, message: str) -> None:
                span.set_attribute("rpc.grpc.status_code", code)
                if code:
                    span.set_status(Status(StatusCode.ERROR, message))

            yield outcome

    def wrap_store(self, store: CounterStore) -> CounterStore:
        return TracedStore(store, self)

    async def shutdown(self) -> None:
        # Flushing the batch processor blocks on the network: keep the event loop free.
        await asyncio.to_thread(self.provider.shutdown)


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
