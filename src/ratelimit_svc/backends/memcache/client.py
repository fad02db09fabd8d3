"""A small asyncio memcached client: the text-protocol commands the store needs (multi-key ``get``,
``incr``, ``add``, ``version``), pipelined per server over TCP or TLS, sharded as the reference's
client, a connection reused only after a complete exchange (docs/backends.md (Memcached)).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ratelimit_svc.errors import BackendError

_T = TypeVar("_T")

MAX_KEY_BYTES = 250
_SRV_NAME = re.compile(r"^_(.+?)\._(.+?)\.(.+)$")

# An SRV lookup: name → (target, port) records.
SrvResolver = Callable[[str], Awaitable[list[tuple[str, int]]]]


class ProtocolError(BackendError):
    """memcached answered something this client did not expect (or an error line)."""


def legal_key(key: bytes) -> bool:
    """What gomemcache (and memcached's text protocol) accepts: 1..250 bytes, no space or
    control characters."""
    return 0 < len(key) <= MAX_KEY_BYTES and not any(b <= 0x20 or b == 0x7F for b in key)


def split_server(server: str) -> tuple[str, int]:
    host, colon, port = server.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"memcache: invalid server address {server!r}: expected host:port")
    return host, int(port)


def pick(key: bytes, count: int) -> int:
    """gomemcache's ServerList.PickServer: the index of the server that holds ``key``."""
    return 0 if count == 1 else zlib.crc32(key) % count


def tls_context(
    *, cacert: str = "", client_cert: str = "", client_key: str = "", skip_hostname: bool = False
) -> ssl.SSLContext:
    """MEMCACHE_TLS_*: verify the server against the CA (or the system's), optionally present a
    client certificate; skipping the hostname check still verifies the chain."""
    context = ssl.create_default_context(cafile=cacert or None)
    if client_cert:
        context.load_cert_chain(client_cert, client_key or None)
    context.check_hostname = not skip_hostname
    return context


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()  # no wait: the transport closes in the background


class Server:
    """One memcached server: an idle-connection pool and one-write exchanges on it."""

    def __init__(
        self, address: str, *, max_idle: int = 2, tls: ssl.SSLContext | None = None
    ) -> None:
        self.address = address
        self.host, self.port = split_server(address)
        self._max_idle = max_idle
        self._tls = tls
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self.opened = 0  # connections ever opened (tests, stats)

    def __repr__(self) -> str:
        return f"memcache.Server({self.address})"

    async def exchange(
        self, payload: bytes, read: Callable[[asyncio.StreamReader], Awaitable[_T]]
    ) -> _T:
        """Write ``payload`` (any number of commands) and ``read`` the replies, on one connection.

        Failures raise ``BackendError`` naming this server. The caller bounds the time.
        """
        try:
            conn = self._idle.pop() if self._idle else await self._connect()
        except (OSError, ssl.SSLError) as exc:
            raise BackendError(f"memcache: cannot connect to {self.address}: {exc}") from None
        self._busy.add(conn)
        try:
            conn.writer.write(payload)
            await conn.writer.drain()
            result = await read(conn.reader)
        except BaseException as exc:
            # A reply may still be on its way: this socket must never be reused.
            self._busy.discard(conn)
            conn.close()
            if isinstance(exc, ProtocolError):
                raise ProtocolError(f"{exc} ({self.address})") from None
            if isinstance(exc, (OSError, EOFError, asyncio.IncompleteReadError, ValueError)):
                raise BackendError(
                    f"memcache: {self.address}: {exc or type(exc).__name__}"
                ) from None
            raise
        self._busy.discard(conn)
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return result

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self._tls,
            # An SRV target ends with a dot; certificates name hosts without it.
            server_hostname=self.host.rstrip(".") if self._tls else None,
        )
        self.opened += 1
        return _Connection(reader, writer)

    async def close(self) -> None:
        connections = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        for conn in connections:
            conn.close()
        for conn in connections:
            with contextlib.suppress(OSError, ssl.SSLError):
                await conn.writer.wait_closed()

    # -- commands -------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """``get k1 k2 ...``: the values of the keys present."""
        return await self.exchange(b"get " + b" ".join(keys) + b"\r\n", _read_values)

    async def incr_many(self, items: Sequence[tuple[bytes, int]]) -> list[int | None]:
        """``incr`` each key by its delta, pipelined: new values, None where the key is missing."""
        payload = b"".join(b"incr %s %d\r\n" % (key, delta) for key, delta in items)

        async def read(reader: asyncio.StreamReader) -> list[int | None]:
            results: list[int | None] = []
            for _ in items:
                line = await _read_line(reader)
                results.append(None if line == b"NOT_FOUND" else _number(line))
            return results

        return await self.exchange(payload, read)

    async def add_many(self, items: Sequence[tuple[bytes, int, int]]) -> list[bool]:
        """``add`` each (key, value, exptime), pipelined: True where stored, False where the key
        already existed."""
        payload = b"".join(
            b"add %s 0 %d %d\r\n%s\r\n" % (key, exptime, len(data), data)
            for key, value, exptime in items
            for data in (b"%d" % value,)
        )

        async def read(reader: asyncio.StreamReader) -> list[bool]:
            results: list[bool] = []
            for _ in items:
                line = await _read_line(reader)
                if line not in (b"STORED", b"NOT_STORED"):
                    raise ProtocolError(f"memcache: unexpected reply to add: {line!r}")
                results.append(line == b"STORED")
            return results

        return await self.exchange(payload, read)

    async def version(self) -> str:
        async def read(reader: asyncio.StreamReader) -> str:
            line = await _read_line(reader)
            if not line.startswith(b"VERSION "):
                raise ProtocolError(f"memcache: unexpected reply to version: {line!r}")
            return line[8:].decode(errors="replace")

        return await self.exchange(b"version\r\n", read)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\r\n")
    line = line[:-2]
    if line == b"ERROR" or line.startswith((b"CLIENT_ERROR", b"SERVER_ERROR")):
        raise ProtocolError(f"memcache: {line.decode(errors='replace')}")
    return line


def _number(line: bytes) -> int:
    if not line.isdigit():
        raise ProtocolError(f"memcache: expected a number, got {line!r}")
    return int(line)


async def _read_values(reader: asyncio.StreamReader) -> dict[bytes, bytes]:
    values: dict[bytes, bytes] = {}
    while True:
        line = await _read_line(reader)
        if line == b"END":
            return values
        parts = line.split(b" ")
        if len(parts) < 4 or parts[0] != b"VALUE" or not parts[3].isdigit():
            raise ProtocolError(f"memcache: unexpected reply to get: {line!r}")
        data = await reader.readexactly(int(parts[3]) + 2)
        values[parts[1]] = data[:-2]


# -- SRV ----------------------------------------------------------------------------------------


def check_srv_name(name: str) -> None:
    """MEMCACHE_SRV must look like ``_service._proto.name`` (as the reference parses it)."""
    if not _SRV_NAME.match(name):
        raise BackendError(
            f"memcache: could not parse MEMCACHE_SRV {name!r} to SRV parts "
            "(expected _service._proto.name)"
        )


async def dns_srv_records(name: str) -> list[tuple[str, int]]:
    """SRV records of ``name`` from DNS (dnspython, imported here only)."""
    try:
        import dns.asyncresolver
        import dns.exception
    except ImportError:  # pragma: no cover - depends on the installation
        raise BackendError(
            "memcache: MEMCACHE_SRV needs dnspython (pip install 'ratelimit-svc[memcache]')"
        ) from None
    try:
        answer = await dns.asyncresolver.resolve(name, "SRV")
    except dns.exception.DNSException as exc:
        raise BackendError(f"memcache: SRV lookup of {name!r} failed: {exc}") from None
    return [(record.target.to_text(), int(record.port)) for record in answer]


def servers_from_srv(records: Sequence[tuple[str, int]]) -> list[str]:
    """``target:port`` strings, sorted as the reference sorts them (gomemcache shards by order)."""
    return sorted(f"{target}:{port}" for target, port in records)
