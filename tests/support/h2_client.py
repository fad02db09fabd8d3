"""A raw HTTP/2 client (hyper-h2 over asyncio) for the gRPC wire tests: what grpcio never sends
(a message split across DATA frames at chosen points, a wrong content-type, a bad grpc-timeout)
and what it hides (the exact headers, trailers and GOAWAY frames a server sends)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

READ_TIMEOUT = 30.0


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


def grpc_headers(path: str, *extra: tuple[str, str], content_type: str = "application/grpc") -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
        ("content-type", content_type), ("te", "trailers"), *extra,
    ]  # fmt: skip


@dataclass
class Answer:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False

    @property
    def grpc_status(self) -> int | None:
        """From the trailers, or from the headers of a trailers-only response."""
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


class H2Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
        self.answers: dict[int, Answer] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.goaway = asyncio.Event()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> H2Connection:
        reader, writer = await asyncio.open_connection(host, port)
        self = cls(reader, writer)
        self.conn.initiate_connection()
        await self.flush()
        return self

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def call(self, headers: Sequence[tuple[str, str]], chunks: Sequence[bytes], *, pause: float = 0.0) -> Answer:
        """One stream: the headers, then each chunk as its own DATA frame (``pause`` between)."""
        stream = self.conn.get_next_available_stream_id()
        self.answers[stream] = Answer()
        self.ended[stream] = asyncio.Event()
        self.conn.send_headers(stream, list(headers), end_stream=not chunks)
        await self.flush()
        for index, chunk in enumerate(chunks):
            if index and pause:
                await asyncio.sleep(pause)
            last = index == len(chunks) - 1
            while True:  # within the flow-control window, in frames of the allowed size
                window = min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
                if window <= 0:
                    await self.read_once()
                    continue
                piece, chunk = chunk[:window], chunk[window:]
                self.conn.send_data(stream, piece, end_stream=last and not chunk)
                await self.flush()
                if not chunk:
                    break
        async with asyncio.timeout(READ_TIMEOUT):
            while not self.ended[stream].is_set():
                await self.read_once()
        return self.answers[stream]

    async def read_once(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            for event in self.ended.values():
                event.set()
            self.goaway.set()
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:  # frames after the connection ended (a PING after GOAWAY)
            self.goaway.set()
            return
        for event in events:
            stream = getattr(event, "stream_id", 0)
            answer = self.answers.get(stream)
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                answer.headers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = True
                self.ended[stream].set()
            elif isinstance(event, h2.events.StreamEnded) and answer is not None:
                self.ended[stream].set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway.set()
        await self.flush()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
