"""A real ADS management server for the xDS tests: grpc.aio, in-process, on a loopback port.

It serves Envoy's AggregatedDiscoveryService/StreamAggregatedResources the way a state-of-the-world
control plane does: ``set_snapshot`` stores the complete set of RateLimitConfig resources under a
version and pushes it, with a fresh nonce, to every open stream; a new stream gets the current
snapshot in answer to its first request. Every request that arrives (subscription, ACK, NACK) is
recorded with the stream's call metadata, and tests await them with ``wait_request``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2

from ratelimit_svc.config.xds import TYPE_URL
from ratelimit_svc.pb.envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from ratelimit_svc.pb.ratelimit.config.ratelimit.v3 import rls_conf_pb2

WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Seen:
    """One DiscoveryRequest as the server received it."""

    stream: int
    request: Any  # discovery_pb2.DiscoveryRequest
    metadata: dict[str, str | bytes]

    @property
    def is_ack(self) -> bool:
        return bool(self.request.response_nonce) and not self.request.HasField("error_detail")

    @property
    def is_nack(self) -> bool:
        return bool(self.request.HasField("error_detail"))


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.sent: list[Any] = []  # every DiscoveryResponse, in order
        self.version: str | None = None
        self.resources: list[Any] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._next_stream = 0
        self._nonce = 0
        self._changed = asyncio.Condition()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, port: int = 0, credentials: grpc.ServerCredentials | None = None
    ) -> int:
        # No SO_REUSEPORT: a restart must really get this port back, not share it with another.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(None)

    # -- control plane ---------------------------------------------------------------------------

    async def set_snapshot(
        self, version: str, configs: Sequence[Any], *, raw: Sequence[Any] = ()
    ) -> None:
        """Make ``configs`` (RateLimitConfig messages) plus ``raw`` Any resources the whole state,
        and push it to every open stream."""
        resources = []
        for config in configs:
            packed = any_pb2.Any()
            packed.Pack(config)
            resources.append(packed)
        self.version, self.resources = version, [*resources, *raw]
        for queue in self._streams.values():
            queue.put_nowait(self._response())

    def _response(self) -> Any:
        self._nonce += 1
        response = discovery_pb2.DiscoveryResponse(
            version_info=self.version,
            resources=self.resources,
            type_url=TYPE_URL,
            nonce=f"nonce-{self._nonce}",
        )
        self.sent.append(response)
        return response

    @property
    def last_nonce(self) -> str:
        return str(self.sent[-1].nonce)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def wait_request(
        self, predicate: Callable[[Seen], bool], *, after: int = 0
    ) -> Seen:
        """The first request from index ``after`` on that satisfies ``predicate``."""

        def found() -> Seen | None:
            return next((seen for seen in self.requests[after:] if predicate(seen)), None)

        async with asyncio.timeout(WAIT_SECONDS), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result

    # -- the stream ----------------------------------------------------------------------------

    async def StreamAggregatedResources(  # the protocol names the method
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        stream = self._next_stream
        self._next_stream += 1
        metadata = {item.key: item.value for item in context.invocation_metadata()}
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[stream] = queue
        reader = asyncio.create_task(self._read(stream, requests, metadata, queue))
        try:
            while True:
                yield await queue.get()
        finally:
            del self._streams[stream]
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        stream: int,
        requests: AsyncIterator[Any],
        metadata: dict[str, str | bytes],
        queue: asyncio.Queue[Any],
    ) -> None:
        first = True
        async for request in requests:
            async with self._changed:
                self.requests.append(Seen(stream, request, metadata))
                self._changed.notify_all()
            if first and self.version is not None:
                queue.put_nowait(self._response())
            first = False


# -- building resources ----------------------------------------------------------------------------

def rule(
    key: str,
    value: str = "",
    *,
    unit: rls_conf_pb2.RateLimitUnit = rls_conf_pb2.MINUTE,
    per_unit: int = 10,
    **fields: Any,
) -> Any:
    """One descriptor with a rate limit (``fields``: other RateLimitDescriptor fields)."""
    return rls_conf_pb2.RateLimitDescriptor(
        key=key,
        value=value,
        rate_limit=rls_conf_pb2.RateLimitPolicy(unit=unit, requests_per_unit=per_unit),
        **fields,
    )


def rate_limit_config(name: str, domain: str, *descriptors: Any) -> Any:
    return rls_conf_pb2.RateLimitConfig(name=name, domain=domain, descriptors=descriptors)
