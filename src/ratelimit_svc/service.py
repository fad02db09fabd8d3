"""ShouldRateLimit in protobuf terms: request → limiter → response, and the one place where errors
become gRPC statuses (docs/operations.md (Errors)): request errors INVALID_ARGUMENT, backend
failures and "no configuration loaded" UNAVAILABLE, a counter the backend refuses (``CounterError``)
FAILED_PRECONDITION (docs/backends.md (Error classes)), anything unexpected INTERNAL.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, cast

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.errors import BackendError, CounterError, NoConfigError, RequestError
from ratelimit_svc.limiter.limiter import Decision, Limiter, Request, RequestDescriptor
from ratelimit_svc.limiter.matching import Override
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.pb.envoy.config.core.v3 import base_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2
from ratelimit_svc.rls_wire import ResponseEncoder, decode_request

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


class CallTracer(Protocol):
    """Tracing's hook (tracing.Tracing): a SERVER span around one call."""

    def server_span(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]], domain: str
    ) -> AbstractContextManager[Callable[[int, str], None]]: ...


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
    """The request, or why its bytes are not one (corrupt wire format, a string field that is not
    UTF-8): answered INVALID_ARGUMENT with protobuf's reason, never UNKNOWN."""
    try:
        return rls_pb2.RateLimitRequest.FromString(data)
    except DecodeError as exc:
        return MalformedRequest(str(exc) or "cannot parse the request")


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


class Deadline:
    """One call's deadline in ``Deadlines``."""

    __slots__ = ("cancelling", "done", "expired", "task", "when")

    def __init__(self, when: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.when = when
        self.task = task
        self.cancelling = cancelling  # the task's cancel requests before this deadline
        self.expired = False
        self.done = False


class Deadlines:
    """The callers' deadlines (``grpc-timeout``) of the calls in flight under one loop timer: a
    call whose deadline passes has its task cancelled and sees TimeoutError, as under
    ``asyncio.timeout``, without a timer and a context manager per call (Envoy sends a deadline
    with every request; docs/performance.md (What the hot path avoids))."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # ties in time: first in, first out
        self._finished = 0  # calls finished before their deadline, still in the heap
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._heap) - self._finished

    def start(self, seconds: float) -> Deadline:
        """The current task's deadline, ``seconds`` from now."""
        loop = self._loop
        if loop is None:
            # Once: asyncio.get_running_loop() makes a getpid() system call on Python 3.11.
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        deadline = Deadline(loop.time() + seconds, task, task.cancelling())
        heapq.heappush(self._heap, (deadline.when, next(self._order), deadline))
        if deadline.when < self._timer_at:
            self._arm(deadline.when)
        return deadline

    def finish(self, deadline: Deadline) -> bool:
        """The call is over; True if its deadline had passed (its cancel request withdrawn)."""
        deadline.done = True
        if deadline.expired:
            return deadline.task.uncancel() <= deadline.cancelling
        self._finished += 1
        heap = self._heap
        if self._finished > 64 and self._finished * 2 > len(heap):
            # Mostly calls that finished in time: drop them (their deadlines may be far away).
            self._heap = [entry for entry in heap if not entry[2].done]
            heapq.heapify(self._heap)
            self._finished = 0
        return False

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        assert self._loop is not None
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        heap = self._heap
        while heap and (heap[0][0] <= now or heap[0][2].done):
            _, _, deadline = heapq.heappop(heap)
            if deadline.done:
                self._finished -= 1
            else:
                deadline.expired = True
                deadline.task.cancel()
        if heap:
            self._arm(heap[0][0])


class Status(IntEnum):
    """The gRPC status codes this service answers with (numbers from the gRPC protocol)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    FAILED_PRECONDITION = 9
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call's failure as the gRPC status (and message) every transport answers with."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


SHOULD_RATE_LIMIT = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


class RateLimitService:
    """The servicer, independent of the server that carries it (``handle``: bytes in, bytes out).
    ``config`` returns the current snapshot (None until one loads)."""

    def __init__(
        self,
        limiter: Limiter,
        config: Callable[[], RateLimitConfig | None],
        stats: ServiceStats,
        limits: RequestLimits = RequestLimits(),
        tracer: CallTracer | None = None,
    ) -> None:
        self.limiter = limiter
        self.config = config
        self.stats = stats
        self.limits = limits
        self.tracer = tracer
        self._encoder = ResponseEncoder()
        self._deadlines = Deadlines()

    async def should_rate_limit(self, request: Request) -> Decision:
        """Decide, counting the call and its failure by kind: the HTTP port's entry point (the
        gRPC ports come through ``handle``, which counts the same)."""
        self.stats.add(STAT_TOTAL_REQUESTS)
        try:
            check_request_limits(request, self.limits)
            return await self.limiter.should_rate_limit(self.config(), request)
        except BaseException as exc:
            self._count_failure(exc)
            raise

    def _count_failure(self, exc: BaseException) -> None:
        if isinstance(exc, RequestError | NoConfigError):
            self.stats.add(STAT_SERVICE_ERROR)
        elif isinstance(exc, BackendError):
            self.stats.add(STAT_BACKEND_ERROR)
        elif isinstance(exc, CounterError):
            self.stats.add(STAT_COUNTER_ERROR)

    def handle(
        self,
        data: bytes,
        time_left: float | None = None,
        metadata: Callable[[], Sequence[tuple[str, str | bytes]]] | None = None,
    ) -> Awaitable[bytes]:
        """One ShouldRateLimit call in wire terms, whichever server carries it: the request's bytes
        in, the response's bytes out, or ``RpcError`` with the gRPC status to answer. ``time_left``
        is the caller's deadline (seconds left) when the server does not enforce it itself;
        ``metadata`` gives the call's headers (read only when tracing, for the caller's trace).
        Without tracing the awaitable is ``_decide``'s coroutine itself (one coroutine less per
        call); a malformed request raises here."""
        request = decode_request(data)
        if request is None:  # not one the fast path reads: the generated code (rls_wire.py)
            message = parse_request(data)
            if isinstance(message, MalformedRequest):
                self.stats.add(STAT_TOTAL_REQUESTS)
                self.stats.add(STAT_SERVICE_ERROR)
                raise RpcError(
                    Status.INVALID_ARGUMENT, f"malformed RateLimitRequest: {message.error}"
                )
            request = request_from_proto(message)
        if self.tracer is None:
            return self._decide(request, time_left)
        return self._traced(self.tracer, request, time_left, metadata)

    async def _traced(
        self,
        tracer: CallTracer,
        request: Request,
        time_left: float | None,
        metadata: Callable[[], Sequence[tuple[str, str | bytes]]] | None,
    ) -> bytes:
        headers = metadata() if metadata is not None else ()
        with tracer.server_span(SHOULD_RATE_LIMIT, headers, request.domain) as outcome:
            try:
                response = await self._decide(request, time_left)
            except RpcError as exc:
                outcome(exc.code, exc.message)
                raise
            outcome(Status.OK, "")
            return response

    async def _decide(self, request: Request, time_left: float | None) -> bytes:
        """``should_rate_limit`` (written out here: a coroutine less per call) and the response's
        bytes, its failures as gRPC statuses."""
        started = _perf_counter()
        self.stats.add(STAT_TOTAL_REQUESTS)
        try:
            try:
                check_request_limits(request, self.limits)
                if time_left is None:
                    decision = await self.limiter.should_rate_limit(self.config(), request)
                else:
                    deadline = self._deadlines.start(time_left)
                    try:
                        decision = await self.limiter.should_rate_limit(self.config(), request)
                    except BaseException as exc:
                        # A cancellation that the deadline caused is the caller's timeout.
                        expired = self._deadlines.finish(deadline)
                        if expired and isinstance(exc, asyncio.CancelledError):
                            raise TimeoutError from None
                        raise
                    self._deadlines.finish(deadline)
            except BaseException as exc:
                self._count_failure(exc)
                raise
        except RequestError as exc:
            raise RpcError(Status.INVALID_ARGUMENT, str(exc)) from None
        except (BackendError, NoConfigError) as exc:
            raise RpcError(Status.UNAVAILABLE, str(exc)) from None
        except CounterError as exc:
            raise RpcError(Status.FAILED_PRECONDITION, str(exc)) from None
        except TimeoutError:
            # The caller's deadline passed while the backend was being waited for: count it as
            # the backend timeout it is.
            self.stats.add(STAT_BACKEND_ERROR)
            raise RpcError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except Exception:
            log.exception("unexpected error in ShouldRateLimit")
            raise RpcError(Status.INTERNAL, "internal error") from None
        finally:
            self.stats.observe_ms(STAT_RESPONSE_TIME, (_perf_counter() - started) * 1000.0)
        encoded = self._encoder.encode(decision)
        if encoded is None:  # headers, metadata or an unusual value: the generated code
            encoded = response_to_proto(decision).SerializeToString()
        return encoded
