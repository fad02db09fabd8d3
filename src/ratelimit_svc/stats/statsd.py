"""The statsd and DogStatsD sinks: flushed stats as the reference's text lines (counters as deltas,
gauges, timers; EXTRA_TAGS as name suffixes or DogStatsD tags), buffered and sent in the
background over UDP or TCP, so an unreachable statsd never slows or fails a request
(docs/observability.md (statsd, DogStatsD)).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

UDP_PACKET_BYTES = 1432  # gostats': no fragmentation on a 1500-byte MTU
TCP_WRITE_BYTES = 1 << 16
MAX_BUFFER_BYTES = 1 << 22  # gostats' bound on queued stats
SEND_INTERVAL = 1.0
CONNECT_TIMEOUT = 1.5
WRITE_TIMEOUT = 1.0
_TAG_VALUE = str.maketrans({".": "_", ":": "_", "|": "_"})


def format_number(value: float) -> str:
    """gostats: integers as integers, anything else with six decimals."""
    if value >= 0 and value == int(value):
        return str(int(value))
    return f"{value:.6f}"


def tag_suffix(tags: Mapping[str, str]) -> str:
    """gostats' tag serialization into the name: ``.__k=v`` sorted by key, empty ones skipped."""
    pairs = sorted((key, value) for key, value in tags.items() if key and value)
    return "".join(f".__{key}={value.translate(_TAG_VALUE)}" for key, value in pairs)


@dataclass(frozen=True, slots=True)
class Mogrifier:
    """USE_DOG_STATSD_MOGRIFIERS: a name matching ``pattern`` is renamed and tagged ($1, $2...)."""

    pattern: re.Pattern[str]
    name: str
    tags: tuple[tuple[str, str], ...]

    def apply(self, name: str) -> tuple[str, list[str]] | None:
        found = self.pattern.search(name)
        if found is None:
            return None
        groups = [found.group(0), *(g or "" for g in found.groups())]

        def expand(template: str) -> str:
            return re.sub(r"\$(\d+)", lambda m: groups[int(m.group(1))], template)

        return expand(self.name), [f"{key}:{expand(value)}" for key, value in self.tags]


class StatsdSink:
    """Plain statsd (``tags_in_name``) or DogStatsD lines to host:port over ``protocol``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        protocol: str = "udp",
        extra_tags: Mapping[str, str] | None = None,
        dogstatsd: bool = False,
        mogrifiers: Sequence[Mogrifier] = (),
    ) -> None:
        self.host, self.port, self.protocol = host, port, protocol
        self.dogstatsd = dogstatsd
        self.mogrifiers = tuple(mogrifiers)
        tags = dict(extra_tags or {})
        self._name_suffix = "" if dogstatsd else tag_suffix(tags)
        self._tags = [f"{k}:{v}" for k, v in sorted(tags.items()) if k and v] if dogstatsd else []
        self._lines: list[bytes] = []
        self._buffered = 0
        self.dropped_bytes = 0
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.StreamWriter | None = None
        self._failing = False
        self._sending = asyncio.Lock()

    # -- StatsSink -------------------------------------------------------------------------------

    def flush_counter(self, name: str, value: int) -> None:
        self._line(name, str(value), "c")

    def flush_gauge(self, name: str, value: int) -> None:
        self._line(name, str(value), "g")

    def flush_timer(self, name: str, milliseconds: float) -> None:
        self._line(name, format_number(milliseconds), "ms")

    def _line(self, name: str, value: str, kind: str) -> None:
        if self.dogstatsd:
            tags = list(self._tags)
            for mogrifier in self.mogrifiers:
                done = mogrifier.apply(name)
                if done is not None:
                    name, more = done
                    tags.extend(more)
                    break
            suffix = f"|#{','.join(tags)}" if tags else ""
            line = f"{name}:{value}|{kind}{suffix}\n".encode()
        else:
            line = f"{name}{self._name_suffix}:{value}|{kind}\n".encode()
        if self._buffered + len(line) > MAX_BUFFER_BYTES:
            if not self.dropped_bytes:
                log.error("statsd buffer full (%d bytes): dropping stats", MAX_BUFFER_BYTES)
            self.dropped_bytes += len(line)
            return
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= self._batch_bytes():
            self._kick.set()

    def _batch_bytes(self) -> int:
        return UDP_PACKET_BYTES if self.protocol == "udp" else TCP_WRITE_BYTES

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="statsd-sink")

    async def flush(self) -> None:
        """Send everything buffered now (best effort)."""
        await self._send()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._send()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await self._close_tcp()

    async def _run(self) -> None:
        while True:
            # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the
            # inner wait completes (CPython gh-86296), and under load (the event set constantly)
            # ``close`` then waited for this task forever: the process never exited on SIGTERM.
            try:
                async with asyncio.timeout(SEND_INTERVAL):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            await self._send()

    # -- network ---------------------------------------------------------------------------------

    def _take(self) -> list[bytes]:
        """The buffered lines packed into writes of at most one batch each."""
        limit = self._batch_bytes()
        chunks: list[bytes] = []
        current: list[bytes] = []
        size = 0
        for line in self._lines:
            if current and size + len(line) > limit:
                chunks.append(b"".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line)
        if current:
            chunks.append(b"".join(current))
        self._lines, self._buffered = [], 0
        return chunks

    async def _send(self) -> None:
        async with self._sending:
            if not self._lines:
                return
            await self._send_locked()

    async def _send_locked(self) -> None:
        try:
            if self.protocol == "udp":
                await self._send_udp()
            else:
                await self._send_tcp()
        except (OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning(
                    "statsd %s %s:%d unreachable: %s (stats are dropped until it answers)",
                    self.protocol, self.host, self.port, exc,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("statsd %s %s:%d reachable again", self.protocol, self.host, self.port)
        self._failing = False
        self.dropped_bytes = 0

    async def _send_udp(self) -> None:
        if self._udp is None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=(self.host, self.port)
            )
            self._udp = transport
        for chunk in self._take():
            self._udp.sendto(chunk)

    async def _send_tcp(self) -> None:
        if self._tcp is None or self._tcp.is_closing():
            await self._close_tcp()
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, self._tcp = await asyncio.open_connection(self.host, self.port)
        writer = self._tcp
        try:
            for chunk in self._take():  # taken once connected: kept (bounded) while unreachable
                writer.write(chunk)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            await self._close_tcp()
            raise

    async def _close_tcp(self) -> None:
        writer, self._tcp = self._tcp, None
        if writer is None:
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
