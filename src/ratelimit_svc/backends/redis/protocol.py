"""The Redis wire protocol on one socket (docs/backends.md, The client): ``Connection`` is an
``asyncio.Protocol`` over ``hiredis.Reader`` holding a FIFO of calls. Every call queued during one
turn of the event loop goes out in ONE socket write; replies are handed back in order, each caller
getting exactly its own, error replies in place as ``ReplyError``. One timer per connection bounds
every call: if the oldest call sent is unanswered at its deadline the connection is reset, failing
every call on it, so no late reply can ever be read by a later call. Replies that say the server
cannot serve this connection (``RESET_ON``) reset it too. ``PoolStats`` counts connections.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis

from ratelimit_svc.errors import BackendError

Command = tuple[str | int, ...]

# Error replies after which this connection cannot serve the next call either.
RESET_ON = frozenset({"READONLY", "LOADING", "MASTERDOWN", "MOVED"})


class ReplyError(Exception):
    """An error reply from Redis, read whole (the connection stays in step)."""

    @property
    def prefix(self) -> str:
        """The error code: ``WRONGTYPE``, ``ERR``, ``READONLY``, ``MOVED``, ..."""
        return str(self).split(" ", 1)[0]


class PoolStats:
    """Connection counts for the ``redis_pool.cx_*`` stats."""

    __slots__ = ("active", "local_close", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.local_close = 0

    def as_dict(self) -> dict[str, int]:
        """Open connections, connections ever opened, and those closed from this side."""
        return {
            "cx_active": self.active,
            "cx_total": self.total,
            "cx_local_close": self.local_close,
        }


# hiredis's stubs declare a one-element tuple; it packs any tuple of str, bytes, int or float.
_pack_command = cast(Callable[[Command], bytes], hiredis.pack_command)


def pack(commands: Sequence[Command]) -> bytes:
    """The commands in the Redis wire protocol (arrays of bulk strings), back to back."""
    if len(commands) == 1:
        return _pack_command(commands[0])
    return b"".join([_pack_command(command) for command in commands])


# "$<length>\r\n<n>\r\n" of the small numbers every increment carries (hits, TTL seconds).
_NUMBERS = [b"$%d\r\n%d\r\n" % (len(str(n)), n) for n in range(4096)]


def _number(n: int) -> bytes:
    return b"$%d\r\n%d\r\n" % (len(str(n)), n)


def increment_commands(increments: Sequence[tuple[str, int, int, int]]) -> list[Command]:
    """INCRBY and EXPIRE of each (key, hits, window, ttl), in order."""
    commands: list[Command] = []
    for key, hits, _, ttl in increments:
        commands += (("INCRBY", key, hits), ("EXPIRE", key, ttl))
    return commands


def pack_increments(increments: Sequence[tuple[str, int, int, int]]) -> bytes:
    """``pack(increment_commands(increments))``, written directly: a third of the cost, since
    every request of a 5-descriptor config packs ten commands (docs/performance.md)."""
    out: list[bytes] = []
    for key, hits, _, ttl in increments:
        encoded = key.encode()
        name = b"$%d\r\n%b\r\n" % (len(encoded), encoded)
        out += (
            b"*3\r\n$6\r\nINCRBY\r\n", name,
            _NUMBERS[hits] if 0 <= hits < 4096 else _number(hits),
            b"*3\r\n$6\r\nEXPIRE\r\n", name,
            _NUMBERS[ttl] if 0 <= ttl < 4096 else _number(ttl),
        )  # fmt: skip
    return b"".join(out)


class _Call:
    """One caller's commands: sent together, answered together."""

    __slots__ = ("count", "data", "deadline", "future", "replies")

    def __init__(
        self, data: bytes, count: int, deadline: float, future: asyncio.Future[list[Any]]
    ) -> None:
        self.data = data
        self.count = count
        self.deadline = deadline
        self.future = future
        self.replies: list[Any] = []


Push = Callable[[Any], None]


class Connection(asyncio.Protocol):
    """One socket to one server: a FIFO of calls, one write per loop turn, one deadline timer.

    With ``on_push``, a reply that arrives while no call waits (a pub/sub message) goes to it.
    """

    def __init__(
        self,
        label: str,
        address: str,
        *,
        op_timeout: float,
        stats: PoolStats,
        reset_on: frozenset[str] = RESET_ON,
        on_push: Push | None = None,
    ) -> None:
        self.label = label
        self.address = address
        self.op_timeout = op_timeout
        self.reset_on = reset_on
        self._stats = stats
        self._on_push = on_push
        self.loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._transport: asyncio.Transport | None = None
        self._waiting: collections.deque[_Call] = collections.deque()
        self._unsent: list[_Call] = []
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.closed = False
        self.lost: asyncio.Future[None] = self.loop.create_future()

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._stats.total += 1
        self._stats.active += 1

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            self._read()
        except hiredis.ProtocolError as exc:
            self.reset(f"{self.address} sent something that is not RESP ({exc})")

    def _read(self) -> None:
        """Hand every complete reply to its call, in order."""
        reader = self._reader
        waiting = self._waiting
        reset: ReplyError | None = None
        while (reply := reader.gets()) is not False:
            if not waiting:
                if self._on_push is not None:
                    self._on_push(reply)
                    continue
                self.reset(f"an unexpected reply from {self.address}")
                return
            call = waiting[0]
            call.replies.append(reply)
            if type(reply) is ReplyError and reply.prefix in self.reset_on:
                reset = reply
            if len(call.replies) == call.count:
                waiting.popleft()
                if not call.future.done():
                    call.future.set_result(call.replies)
            if reset is not None:
                break
        if reset is not None:
            self.reset(f"{self.address} answered {reset.prefix}: reconnecting")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            reason = f": {exc}" if exc else ""
            self._fail_all(BackendError(f"{self.label}: connection to {self.address} lost{reason}"))
        self._shut(local=False)

    # -- calls ------------------------------------------------------------------------------------

    def call(self, data: bytes, count: int, deadline: float) -> asyncio.Future[list[Any]]:
        """Queue ``count`` packed commands for this loop turn's write; their replies, in order."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if self.closed:
            future.set_exception(BackendError(f"{self.label}: connection to {self.address} closed"))
            return future
        self._unsent.append(_Call(data, count, deadline, future))
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadlines)
        return future

    def _flush(self) -> None:
        self._flush_handle = None
        if self.closed or self._transport is None:
            return
        chunks = []
        waiting = self._waiting
        for call in self._unsent:
            if call.future.done():  # cancelled before it was sent: never sent
                continue
            chunks.append(call.data)
            waiting.append(call)
        self._unsent = []
        if chunks:
            self._write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _check_deadlines(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        waiting = self._waiting
        # Drop answered-or-cancelled-and-unsent calls at the heads (they have no deadline left).
        self._unsent = [c for c in self._unsent if not c.future.done()]
        if waiting and waiting[0].deadline <= now:
            self.reset(f"no answer from {self.address} within {self.op_timeout:g}s")
            return
        heads = [queue[0].deadline for queue in (waiting, self._unsent) if queue]
        if heads:
            self._timer = self.loop.call_at(min(heads), self._check_deadlines)

    # -- closing ----------------------------------------------------------------------------------

    def reset(self, reason: str) -> None:
        """Fail every call on this connection with ``reason`` and close it at once."""
        if self.closed:
            return
        self._fail_all(BackendError(f"{self.label}: {reason}"))
        self._shut(local=True)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close now; calls still on it fail (the service closes its store after draining)."""
        self.reset(f"connection to {self.address} closed")

    def _fail_all(self, error: BackendError) -> None:
        calls = [*self._waiting, *self._unsent]
        self._waiting.clear()
        self._unsent = []
        for call in calls:
            if not call.future.done():
                # One exception object per caller: a shared one would tangle tracebacks.
                call.future.set_exception(BackendError(*error.args))

    def _shut(self, *, local: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._closing = True
        if self._transport is not None:
            self._stats.active -= 1
            if local:
                self._stats.local_close += 1
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        if not self.lost.done():
            self.lost.set_result(None)
