"""What this process does on its sockets, seen at the socket itself (the system calls), so a test
observes a client's connects and writes the same way whether the client runs compiled or as
Python (docs/performance.md, Compiled modules: a compiled class's methods cannot be replaced).

A write's boundaries are visible only to the process that makes it: a proxy or the server reads a
byte stream in which two writes may arrive as one read, so "one write per event-loop turn" can
only be checked here. asyncio writes with ``send`` on non-blocking sockets; the tests' own
synchronous admin clients use ``sendall``, and the event loop's internal wake-up socket pair has
no peer address, so neither shows up.

Fixtures:
- ``socket_writes``: the bytes of every ``send`` to a peer while the test runs, one item per call.
- ``socket_connects``: ``Connect(at, address)`` for every TCP connect attempt, refused ones too
  (``at`` is ``time.monotonic()``, the clock of asyncio's loop).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest


@pytest.fixture
def socket_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    writes: list[bytes] = []
    real_send = socket.socket.send

    def send(self: socket.socket, data: Any, *flags: int) -> int:
        sent = real_send(self, data, *flags)
        with_peer = self.family == socket.AF_INET or self.family == socket.AF_INET6
        if with_peer or (self.family == socket.AF_UNIX and self.getpeername()):
            writes.append(bytes(memoryview(data)[:sent]))
        return sent

    monkeypatch.setattr(socket.socket, "send", send)
    yield writes


class Connect(NamedTuple):
    at: float
    address: Any


@pytest.fixture
def socket_connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Connect]]:
    connects: list[Connect] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            connects.append(Connect(time.monotonic(), address))
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield connects
