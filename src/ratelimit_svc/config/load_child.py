"""What runs in a config load process (config/load_process.py starts it): the build, its
encoding (config/snapshot.py) and the answer over the socket, with what the build logged. The
fork server preloads this module and the builder's, so it imports nothing else: no asyncio (an
idle fork server is then ~13 MiB instead of ~16, docs/performance.md#memory).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.snapshot import encode
from ratelimit_svc.errors import ConfigError

log = logging.getLogger(__name__)

LOAD_NICENESS = 10
SIZES = struct.Struct("!QQ")  # the answer: the sizes of its header and of the encoded config


class _Records(logging.Handler):
    """Keeps what the child logs, to be logged again by the parent (which owns the log)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))


def child_main(
    sock: socket.socket,
    build: Callable[..., RateLimitConfig | None],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    # Below the serving processes in the CPU queue: on a busy machine a load takes longer rather
    # than slowing requests down.
    with contextlib.suppress(OSError):
        os.nice(LOAD_NICENESS)
    # The parse makes about ten container objects per config line, none of them in a cycle: the
    # cyclic collector would scan them again and again (more than half of this process's CPU
    # for a big config) to free nothing. This process ends after one load.
    gc.disable()
    handler = _Records()
    package = logging.getLogger(__name__.partition(".")[0])
    package.addHandler(handler)
    package.setLevel(logging.DEBUG)
    package.propagate = False
    status, error, encoded = "ok", "", b""
    started = time.process_time()
    try:
        config = build(*args, **kwargs)
    except ConfigError as exc:
        status, error = "error", str(exc)
    except Exception as exc:  # a defect: still only a failed load, reported as one
        status, error = "error", f"unexpected {type(exc).__name__} while loading: {exc}"
    else:
        if config is None:
            status = "none"
        else:
            encoded = encode(config)
        log.info("config load process: %.3fs of CPU", time.process_time() - started)
    header = pickle.dumps((status, error, handler.records), pickle.HIGHEST_PROTOCOL)
    # The parent closes its end as soon as it has read what the sizes announce (it does not
    # wait for this process to exit), so nothing is sent after the last byte, not even an empty
    # payload; a parent that is gone (cancelled) needs no answer.
    with sock, contextlib.suppress(BrokenPipeError):
        sock.sendall(SIZES.pack(len(header), len(encoded)) + header)
        if encoded:
            sock.sendall(encoded)
