"""gRPC over ASGI: the server side of gRPC's HTTP/2 protocol for an ASGI server (pyvoy).

It owns the wire rules of docs/transports.md (gRPC over ASGI): one length-prefixed message per
unary call, reassembled however the body is chunked; the compressed flag (gzip is read, other
encodings answer UNIMPLEMENTED with ``grpc-accept-encoding``); a size cap (RESOURCE_EXHAUSTED);
``grpc-timeout`` handed to the handler as the time left; ``grpc-status``/``grpc-message`` trailers
(the message percent-encoded), and trailers-only responses for errors; wrong method, content-type
and unknown methods answered as gRPC servers answer them; ``grpc.health.v1.Health`` Check and
Watch on the same port. What a call means is the handler's business: bytes in, bytes out, or
``RpcError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2

from ratelimit_svc.servers.tls import forwarded_sans, san_refusal
from ratelimit_svc.service import SHOULD_RATE_LIMIT, RateLimitService, RpcError, Status
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Metadata = Sequence[tuple[str, str | bytes]]
# A unary method: the request message, the time left before the caller's deadline (None: no
# deadline) and a function giving the call's metadata (read only when wanted).
Unary = Callable[[bytes, float | None, Callable[[], Metadata]], Awaitable[bytes]]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
HEALTH_SERVICES = ("", "ratelimit")
STOP_LISTENING_SECONDS = 1.0  # for Envoy to close its listener when asked
WATCH_END_SECONDS = 1.0  # for the end of a Watch stream to reach us (see GrpcAsgiApp._watch)

_PREFIX = struct.Struct(">BI")
_SERVING: int = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_GRPC_HEADERS = [(b"content-type", b"application/grpc")]
_START = {"type": "http.response.start", "status": 200, "headers": _GRPC_HEADERS, "trailers": True}
_OK_TRAILERS = {
    "type": "http.response.trailers",
    "headers": [(b"grpc-status", b"0")],
    "more_trailers": False,
}
_ACCEPT_ENCODING = (b"grpc-accept-encoding", b"identity,gzip")
_TIMEOUTS_KEPT = 64
# Bytes of grpc-message sent as they are (the protocol's rule: printable ASCII except '%').
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def encode_grpc_message(message: str) -> bytes:
    """``grpc-message`` as the protocol writes it: UTF-8, then %XX for every byte that is not
    printable ASCII, and for '%' itself."""
    return b"".join(
        bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in message.encode("utf-8")
    )


def parse_grpc_timeout(value: bytes) -> float:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; ValueError if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit()) or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"malformed grpc-timeout {value.decode('latin-1')!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]


def frame(message: bytes) -> bytes:
    """One uncompressed length-prefixed message."""
    return _PREFIX.pack(0, len(message)) + message


class Messages:
    """Reassembles length-prefixed messages from body chunks of any size."""

    def __init__(self, max_bytes: int, encoding: bytes | None) -> None:
        self.max_bytes = max_bytes
        self.encoding = encoding
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """The messages ``chunk`` completes (RpcError for one that is too big or undecodable)."""
        buffer = self._buffer
        buffer += chunk
        messages = []
        while len(buffer) >= 5:
            compressed, length = _PREFIX.unpack_from(buffer)
            if self.max_bytes and length > self.max_bytes:
                raise RpcError(
                    Status.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({length} vs. {self.max_bytes})",
                )
            if len(buffer) < 5 + length:
                break
            message = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            messages.append(self._decompress(message) if compressed else message)
        return messages

    def finish(self) -> None:
        """The body ended: RpcError if a message was cut short."""
        if self._buffer:
            raise RpcError(Status.INTERNAL, "request body ended inside a message")

    def _decompress(self, message: bytes) -> bytes:
        if self.encoding in (None, b"identity"):
            raise RpcError(
                Status.INTERNAL, "compressed message flag set without a grpc-encoding"
            )
        # encoding is gzip: anything else was refused before the body was read.
        limit = self.max_bytes or -1
        decompressor = zlib.decompressobj(wbits=31)
        try:
            data = decompressor.decompress(message, limit + 1 if limit > 0 else 0)
        except zlib.error as exc:
            raise RpcError(Status.INTERNAL, f"cannot decompress the message: {exc}") from None
        if limit > 0 and (len(data) > limit or decompressor.unconsumed_tail):
            raise RpcError(
                Status.RESOURCE_EXHAUSTED,
                f"decompressed message larger than max ({self.max_bytes})",
            )
        return data


class HealthState:
    """The serving state ``grpc.health.v1.Health`` reports, with a wake-up for Watch streams."""

    def __init__(self, services: Iterable[str] = HEALTH_SERVICES) -> None:
        self.services = frozenset(services)
        self.serving = False
        self.closed = False
        self._changed = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self._wake()

    def close(self) -> None:
        """End every Watch stream (the server is stopping)."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def status(self, service: str) -> int:
        if service not in self.services:
            return _SERVICE_UNKNOWN
        return _SERVING if self.serving else _NOT_SERVING

    async def changed(self) -> None:
        await self._changed.wait()


class GrpcAsgiApp:
    """An ASGI application answering the unary ``methods`` (path → handler) and Health."""

    def __init__(
        self,
        methods: Mapping[str, Unary],
        health: HealthState,
        *,
        max_message_bytes: int,
        required_san: str = "",
    ) -> None:
        self.methods = dict(methods)
        self.health = health
        self.max_message_bytes = max_message_bytes
        self.required_san = required_san  # GRPC_CLIENT_TLS_SAN: checked on every call
        self.in_flight = 0
        self.closing = False  # stopping: new calls are refused (UNAVAILABLE), never started
        self._idle: asyncio.Future[None] | None = None
        # grpc-timeout values seen, parsed (Envoy sends the same one with every request)
        self._timeouts: dict[bytes, float] = {}

    async def wait_idle(self) -> None:
        """Until no call is in flight."""
        if self.in_flight:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One coroutine per call: the call is written out here (docs/performance.md).
        if scope["type"] != "http":
            return
        self.in_flight += 1
        try:
            if self.closing:
                await _trailers_only(send, Status.UNAVAILABLE, "the server is shutting down")
                return
            content_type = encoding = timeout = None
            client_cert = b""
            for name, value in scope["headers"]:
                if name == b"content-type":
                    content_type = value
                elif name == b"grpc-timeout":
                    timeout = value
                elif name == b"grpc-encoding":
                    encoding = value
                elif name == b"x-forwarded-client-cert":  # set by Envoy, never the client's
                    client_cert = value
            if scope["http_version"] not in ("2", "3"):
                await _plain(send, 505, b"gRPC requires HTTP/2")
                return
            if scope["method"] != "POST":
                message = f"{scope['method']} is not POST: gRPC calls are POST"
                await _trailers_only(send, Status.INTERNAL, message, status=405)
                return
            if content_type is None or not (
                content_type == b"application/grpc"
                or content_type.startswith(b"application/grpc+")
                or content_type.startswith(b"application/grpc;")
            ):
                shown = content_type.decode("latin-1") if content_type is not None else ""
                message = f"invalid gRPC request content-type {shown!r}"
                await _trailers_only(send, Status.INVALID_ARGUMENT, message, status=415)
                return
            if encoding not in (None, b"identity", b"gzip"):
                await _trailers_only(
                    send,
                    Status.UNIMPLEMENTED,
                    f"grpc-encoding {encoding.decode('latin-1')!r} is not supported",
                    extra=(_ACCEPT_ENCODING,),
                )
                return
            if self.required_san and self.required_san not in forwarded_sans(client_cert):
                await self._drain(receive)
                await _trailers_only(send, Status.UNAUTHENTICATED, san_refusal(self.required_san))
                return
            path: str = scope["path"]
            try:
                time_left = None
                if timeout is not None:
                    time_left = self._timeouts.get(timeout)
                    if time_left is None:
                        time_left = self._timeout(timeout)
                if path == HEALTH_WATCH:
                    watched = await self._read_one(await receive(), receive, encoding)
                    await self._watch(watched, receive, send)
                    return
                handler = self.methods.get(path)
                if handler is None and path != HEALTH_CHECK:
                    await self._drain(receive)
                    raise RpcError(Status.UNIMPLEMENTED, f"unknown method {path}")
                event = await receive()
                whole = self._whole(event)
                request = whole if whole is not None else await self._read_one(
                    event, receive, encoding
                )
                if handler is None:
                    response = self._check(request)
                else:
                    response = await handler(request, time_left, lambda: _metadata(scope))
            except RpcError as exc:
                await _trailers_only(send, exc.code, exc.message)
                return
            except ValueError as exc:  # a malformed grpc-timeout
                await _trailers_only(send, Status.INTERNAL, str(exc))
                return
            await send(_START)
            await send({"type": "http.response.body", "body": frame(response), "more_body": False})
            await send(_OK_TRAILERS)
        except OSError:
            pass  # the client went away (reset the stream) before the answer was sent
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    def _timeout(self, value: bytes) -> float:
        seconds = parse_grpc_timeout(value)
        if len(self._timeouts) >= _TIMEOUTS_KEPT:
            self._timeouts.clear()
        self._timeouts[value] = seconds
        return seconds

    def _whole(self, event: Message) -> bytes | None:
        """The usual request body: one event holding one whole uncompressed message within the
        limit, taken as it is (None: anything else, for ``_read_one``)."""
        if event["type"] != "http.request" or event.get("more_body", False):
            return None
        body: bytes = event.get("body", b"")
        if len(body) >= 5 and body[0] == 0:
            length = int.from_bytes(body[1:5], "big")
            if length == len(body) - 5 and not (
                self.max_message_bytes and length > self.max_message_bytes
            ):
                return bytes(body[5:])
        return None

    async def _read_one(self, event: Message, receive: Receive, encoding: bytes | None) -> bytes:
        """The request's one message, reassembled from the body's chunks (``event`` is the
        first)."""
        if event["type"] != "http.request":  # http.disconnect
            raise RpcError(Status.CANCELLED, "the client went away")
        body: bytes = event.get("body", b"")
        more = event.get("more_body", False)
        messages = Messages(self.max_message_bytes, encoding)
        found = messages.feed(body)
        while more:
            event = await receive()
            if event["type"] != "http.request":
                raise RpcError(Status.CANCELLED, "the client went away")
            found += messages.feed(event.get("body", b""))
            more = event.get("more_body", False)
        messages.finish()
        if len(found) != 1:
            raise RpcError(
                Status.INTERNAL if not found else Status.UNIMPLEMENTED,
                f"a unary call takes one request message, not {len(found)}",
            )
        return found[0]

    async def _drain(self, receive: Receive) -> None:
        while True:
            event = await receive()
            if event["type"] != "http.request" or not event.get("more_body", False):
                return

    def _check(self, request: bytes) -> bytes:
        service = _health_service(request)
        status = self.health.status(service)
        if status == _SERVICE_UNKNOWN:
            raise RpcError(Status.NOT_FOUND, f"unknown service {service!r}")
        return _health_response(status)

    async def _watch(self, request: bytes, receive: Receive, send: Send) -> None:
        """Health Watch: the status now, then each change, until the client or server ends it."""
        service = _health_service(request)
        health = self.health
        gone = asyncio.ensure_future(self._drain_until_disconnect(receive))
        # Ended after each outcome, not in a finally: compiled code must not await there
        # (docs/performance.md, Compiled modules).
        try:
            await send(_START)
            sent = None
            while not health.closed and not gone.done():
                status = health.status(service)
                if status != sent:
                    body = frame(_health_response(status))
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    sent = status
                changed = asyncio.ensure_future(health.changed())
                await asyncio.wait((changed, gone), return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                await send(_trailers(Status.UNAVAILABLE, "the server is shutting down"))
        except BaseException:
            await _end_watch(gone)
            raise
        await _end_watch(gone)

    async def _drain_until_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


async def _end_watch(gone: asyncio.Future[None]) -> None:
    """Once the stream has ended the server answers the pending receive with http.disconnect;
    cancelling it before then makes pyvoy complete a cancelled future (an InvalidStateError
    logged by the loop). So wait a little for that, then cancel."""
    if not gone.done():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCH_END_SECONDS):
                await asyncio.shield(gone)
        gone.cancel()


def _health_response(status: int) -> bytes:
    data: bytes = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    return data


def _health_service(request: bytes) -> str:
    try:
        service: str = health_pb2.HealthCheckRequest.FromString(request).service
        return service
    except Exception as exc:  # protobuf's DecodeError
        raise RpcError(Status.INVALID_ARGUMENT, f"malformed HealthCheckRequest: {exc}") from None


def _metadata(scope: Scope) -> Metadata:
    return [(name.decode("latin-1"), value) for name, value in scope["headers"]]


def _trailers(code: Status, message: str) -> Message:
    headers = [(b"grpc-status", b"%d" % code)]
    if message:
        headers.append((b"grpc-message", encode_grpc_message(message)))
    return {"type": "http.response.trailers", "headers": headers, "more_trailers": False}


async def _trailers_only(
    send: Send, code: Status, message: str, *, status: int = 200,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """An error as one HEADERS frame that ends the stream (gRPC's Trailers-Only response)."""
    headers = [*_GRPC_HEADERS, *_trailers(code, message)["headers"], *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _plain(send: Send, status: int, text: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text, "more_body": False})



class AsgiGrpc:
    """The gRPC port as the App sees it when Envoy (pyvoy) owns the socket. ``stop_listening``
    closes Envoy's listener (servers/pyvoy.py)."""

    def __init__(
        self, asgi: GrpcAsgiApp, stop_listening: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.asgi = asgi
        self.stop_listening = stop_listening

    async def set_serving(self, serving: bool) -> None:
        await self.asgi.health.set_serving(serving)

    async def stop(self, grace: float | None) -> None:
        """As grpc's server stop: no new connections or calls (refused, UNAVAILABLE, before any
        handler runs), Watch streams ended, and the calls in flight given ``grace`` to finish."""
        self.asgi.closing = True
        self.asgi.health.close()
        if self.stop_listening is not None:
            # Bounded: while the app is still starting, Envoy's main thread (which answers the
            # admin interface) is waiting for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_LISTENING_SECONDS):
                    await self.stop_listening()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace or 0.0):
                await self.asgi.wait_idle()


async def start_asgi_grpc(
    service: RateLimitService,
    settings: Settings,
    serving: bool,
    stop_listening: Callable[[], Awaitable[None]] | None = None,
) -> AsgiGrpc:
    """The App's gRPC port inside pyvoy (app.GrpcStarter): ShouldRateLimit and Health."""
    health = HealthState()
    await health.set_serving(serving)
    methods = {SHOULD_RATE_LIMIT: service.handle}
    tls = settings.grpc_tls
    asgi = GrpcAsgiApp(
        methods, health, max_message_bytes=settings.max_request_bytes,
        required_san=tls.client_tls_san if tls.server_use_tls else "",
    )  # fmt: skip
    return AsgiGrpc(asgi, stop_listening)
