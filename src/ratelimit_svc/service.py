"""ShouldRateLimit in protobuf terms: request → limiter → response, and errors → gRPC statuses.

This is the only place errors become status codes (SPEC 12): request errors are INVALID_ARGUMENT,
backend failures and "no configuration loaded" are UNAVAILABLE (the reference answers UNKNOWN for
all of them; Envoy treats any error alike, but these tell an operator what happened), and anything
unexpected is INTERNAL — the overall code is never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol, cast

import grpc
from google.protobuf import struct_pb2

from .config import RateLimitConfig, Unit
from .errors import BackendError, NoConfigError, RequestError
from .limiter import Code, Decision, Limiter, Request, RequestDescriptor
from .matching import Override
from .pb.envoy.config.core.v3 import base_pb2
from .pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

log = logging.getLogger(__name__)

_UNITS = {int(u): u for u in Unit}
_Response = rls_pb2.RateLimitResponse
# Our enums carry the protocol's numbers; these tables give them the generated stubs' types.
_PB_CODE = {c: cast(_Response.Code, int(c)) for c in Code}
_PB_UNIT = {u: cast(_Response.RateLimit.Unit, int(u)) for u in Unit}

STAT_SERVICE_ERROR = "ratelimit.service.call.should_rate_limit.service_error"
STAT_BACKEND_ERROR = "ratelimit.service.call.should_rate_limit.redis_error"
STAT_TOTAL_REQUESTS = "ratelimit_server.ShouldRateLimit.total_requests"
STAT_RESPONSE_TIME = "ratelimit_server.ShouldRateLimit.response_time"


class ServiceStats(Protocol):
    def add(self, name: str, value: int = 1) -> None: ...

    def observe_ms(self, name: str, milliseconds: float) -> None: ...


def request_from_proto(message: rls_pb2.RateLimitRequest) -> Request:
    descriptors = []
    for d in message.descriptors:
        override = None
        if d.HasField("limit"):
            override = Override(d.limit.requests_per_unit, _UNITS.get(d.limit.unit, Unit.UNKNOWN))
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        descriptors.append(
            RequestDescriptor(tuple((e.key, e.value) for e in d.entries), override, hits)
        )
    return Request(message.domain, tuple(descriptors), message.hits_addend)


def response_to_proto(decision: Decision) -> rls_pb2.RateLimitResponse:
    response = _Response(overall_code=_PB_CODE[decision.overall])
    for status in decision.statuses:
        out = response.statuses.add(code=_PB_CODE[status.code], limit_remaining=status.remaining)
        rule = status.rule
        if rule is not None:
            out.current_limit.requests_per_unit = rule.requests_per_unit
            out.current_limit.unit = _PB_UNIT[rule.unit]
            if rule.name:
                out.current_limit.name = rule.name
            out.duration_until_reset.seconds = status.reset_seconds
    for key, value in decision.headers:
        response.response_headers_to_add.append(base_pb2.HeaderValue(key=key, value=value))
    if decision.dynamic_metadata is not None:
        metadata = struct_pb2.Struct()
        metadata.update(decision.dynamic_metadata)
        response.dynamic_metadata.CopyFrom(metadata)
    return response


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """The gRPC servicer. ``config`` returns the current snapshot (None until one loads)."""

    def __init__(
        self,
        limiter: Limiter,
        config: Callable[[], RateLimitConfig | None],
        stats: ServiceStats,
    ) -> None:
        self.limiter = limiter
        self.config = config
        self.stats = stats

    async def should_rate_limit(
        self, request: Request, deadline: float | None = None
    ) -> Decision:
        """Decide, mapping failures to our errors; the service's one entry point for all ports."""
        self.stats.add(STAT_TOTAL_REQUESTS)
        try:
            async with asyncio.timeout(deadline):
                return await self.limiter.should_rate_limit(self.config(), request)
        except (RequestError, NoConfigError):
            self.stats.add(STAT_SERVICE_ERROR)
            raise
        except BackendError:
            self.stats.add(STAT_BACKEND_ERROR)
            raise
        except TimeoutError:
            self.stats.add(STAT_BACKEND_ERROR)
            raise BackendError("deadline exceeded while waiting for the backend") from None

    async def ShouldRateLimit(  # the protocol names the method
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        started = time.perf_counter()
        remaining = context.time_remaining()
        try:
            decision = await self.should_rate_limit(request_from_proto(request), remaining)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (BackendError, NoConfigError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception:
            log.exception("unexpected error in ShouldRateLimit")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.stats.observe_ms(STAT_RESPONSE_TIME, (time.perf_counter() - started) * 1000.0)
        return response_to_proto(decision)
