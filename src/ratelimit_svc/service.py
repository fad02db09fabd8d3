"""ShouldRateLimit in protobuf terms: request → limiter → response, and the one place where errors
become gRPC statuses (docs/operations.md (Errors)): request errors INVALID_ARGUMENT, backend
failures and "no configuration loaded" UNAVAILABLE, a counter the backend refuses (``CounterError``)
FAILED_PRECONDITION (docs/backends.md (Error classes)), anything unexpected INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.errors import BackendError, CounterError, NoConfigError, RequestError
from ratelimit_svc.limiter.limiter import Decision, Limiter, Request, RequestDescriptor
from ratelimit_svc.limiter.matching import Override
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.pb.envoy.config.core.v3 import base_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

log = logging.getLogger(__name__)

_UNITS = {int(u): u for u in Unit}
_Response = rls_pb2.RateLimitResponse
# Our enums carry the protocol's numbers; these tables give them the generated stubs' types.
_PB_CODE = {c: cast(_Response.Code, int(c)) for c in Code}
_PB_UNIT = {u: cast(_Response.RateLimit.Unit, int(u)) for u in Unit}

_perf_counter = time.perf_counter

STAT_SERVICE_ERROR = "ratelimit.service.call.should_rate_limit.service_error"
STAT_BACKEND_ERROR = "ratelimit.service.call.should_rate_limit.redis_error"
# Ours: requests failed by a counter the backend refuses (docs/backends.md, Error classes).
STAT_COUNTER_ERROR = "ratelimit.service.call.should_rate_limit.redis_key_error"
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
        entries = tuple([(e.key, e.value) for e in d.entries])  # a list first: no generator
        descriptors.append(RequestDescriptor(entries, override, hits))
    return Request(message.domain, tuple(descriptors), message.hits_addend)


MAX_HITS_ADDEND = 2**32 - 1  # as the request-level field (uint32); Redis fails beyond int64


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may carry (MAX_* settings; 0 = no limit): docs/reliability.md (Limits on
    what one request may carry)."""

    max_descriptors: int = 256
    max_entries: int = 64
    max_value_bytes: int = 65536


def check_request_limits(request: Request, limits: RequestLimits) -> None:
    """Raise RequestError if ``request`` exceeds ``limits`` or carries text that is not UTF-8
    (possible from JSON: a lone surrogate escape), naming the descriptor and entry at fault."""
    count = len(request.descriptors)
    if limits.max_descriptors and count > limits.max_descriptors:
        raise RequestError(
            f"too many descriptors: {count} (MAX_DESCRIPTORS_PER_REQUEST={limits.max_descriptors})"
        )
    max_bytes = limits.max_value_bytes
    _check_text("domain", request.domain, max_bytes)
    for index, descriptor in enumerate(request.descriptors):
        entries = len(descriptor.entries)
        if limits.max_entries and entries > limits.max_entries:
            raise RequestError(
                f"descriptor {index} has too many entries: {entries} "
                f"(MAX_ENTRIES_PER_DESCRIPTOR={limits.max_entries})"
            )
        for position, (key, value) in enumerate(descriptor.entries):
            # Hot path: ASCII text is valid UTF-8 and as many bytes long as it has characters.
            if key.isascii() and value.isascii() and (
                not max_bytes or (len(key) <= max_bytes and len(value) <= max_bytes)
            ):
                continue
            where = f"descriptor {index} entry {position}"
            _check_text(f"{where} key", key, max_bytes)
            _check_text(f"{where} value", value, max_bytes)
        if descriptor.hits_addend is not None and descriptor.hits_addend > MAX_HITS_ADDEND:
            raise RequestError(
                f"descriptor {index} hits_addend {descriptor.hits_addend} is above "
                f"{MAX_HITS_ADDEND}"
            )


def _check_text(what: str, text: str, max_bytes: int) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid UTF-8") from None
    if max_bytes and size > max_bytes:
        raise RequestError(f"{what} is {size} bytes long (MAX_VALUE_BYTES={max_bytes})")


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """What ``parse_request`` hands the servicer for bytes that are not a RateLimitRequest."""

    error: str


def parse_request(data: bytes) -> rls_pb2.RateLimitRequest | MalformedRequest:
    """The request deserializer. grpc answers UNKNOWN when a deserializer raises; returning the
    error instead lets ShouldRateLimit answer INVALID_ARGUMENT with protobuf's reason (corrupt
    wire format, a string field that is not UTF-8)."""
    try:
        return rls_pb2.RateLimitRequest.FromString(data)
    except DecodeError as exc:
        return MalformedRequest(str(exc) or "cannot parse the request")


def add_to_server(service: RateLimitService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_RateLimitServiceServicer_to_server``, but
    with ``parse_request`` as the request deserializer."""
    handlers = {
        "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
            service.ShouldRateLimit,
            request_deserializer=parse_request,
            response_serializer=rls_pb2.RateLimitResponse.SerializeToString,
        )
    }
    name = "envoy.service.ratelimit.v3.RateLimitService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def response_to_proto(decision: Decision) -> rls_pb2.RateLimitResponse:
    response = _Response(overall_code=_PB_CODE[decision.overall])
    for status in decision.statuses:
        out = response.statuses.add(code=_PB_CODE[status.code], limit_remaining=status.remaining)
        rule = status.rule
        if rule is not None:
            current_limit = out.current_limit  # each attribute access builds a wrapper: once
            current_limit.requests_per_unit = rule.requests_per_unit
            current_limit.unit = _PB_UNIT[rule.unit]
            if rule.name:
                current_limit.name = rule.name
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
        limits: RequestLimits = RequestLimits(),
    ) -> None:
        self.limiter = limiter
        self.config = config
        self.stats = stats
        self.limits = limits

    async def should_rate_limit(
        self, request: Request, deadline: float | None = None
    ) -> Decision:
        """Decide, mapping failures to our errors; the service's one entry point for all ports."""
        self.stats.add(STAT_TOTAL_REQUESTS)
        try:
            check_request_limits(request, self.limits)
            if deadline is None:  # no timer to arm (HTTP /json, gRPC callers without a deadline)
                return await self.limiter.should_rate_limit(self.config(), request)
            async with asyncio.timeout(deadline):
                return await self.limiter.should_rate_limit(self.config(), request)
        except (RequestError, NoConfigError):
            self.stats.add(STAT_SERVICE_ERROR)
            raise
        except BackendError:
            self.stats.add(STAT_BACKEND_ERROR)
            raise
        except CounterError:
            self.stats.add(STAT_COUNTER_ERROR)
            raise
        except TimeoutError:
            self.stats.add(STAT_BACKEND_ERROR)
            raise BackendError("deadline exceeded while waiting for the backend") from None

    async def ShouldRateLimit(  # the protocol names the method
        self,
        request: rls_pb2.RateLimitRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> rls_pb2.RateLimitResponse:
        if isinstance(request, MalformedRequest):
            self.stats.add(STAT_TOTAL_REQUESTS)
            self.stats.add(STAT_SERVICE_ERROR)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed RateLimitRequest: {request.error}"
            )
            raise AssertionError("context.abort raises")  # for the type checker
        started = _perf_counter()
        try:
            # The caller's deadline needs no timer here: grpc cancels this task when it passes
            # (Envoy sends one with every request, so a timer each would cost; see below).
            decision = await self.should_rate_limit(request_from_proto(request))
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (BackendError, NoConfigError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except CounterError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                # The deadline passed while the backend was being waited for: count it as the
                # backend timeout it is (a caller that merely went away is not an error).
                self.stats.add(STAT_BACKEND_ERROR)
            raise
        except Exception:
            log.exception("unexpected error in ShouldRateLimit")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.stats.observe_ms(STAT_RESPONSE_TIME, (_perf_counter() - started) * 1000.0)
        return response_to_proto(decision)
