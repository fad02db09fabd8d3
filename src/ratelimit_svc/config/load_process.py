"""Building a config in a child process, so that a load never stalls serving.

Reading, parsing, validating and building the rule tree of a big config takes seconds of CPU and
hundreds of MB of short-lived YAML nodes. ``build_in_child`` runs all of it (a file load, or a big
xDS update) in a process forked from multiprocessing's fork server (never forked from this
process, whose gRPC threads do not survive a fork; the fork server is started once, so no load
starts an interpreter), at a lower CPU priority, which answers with the finished
``RateLimitConfig`` encoded (config/snapshot.py). This process only reads that answer from a
socket and decodes it a slice at a time: its event loop keeps serving, and its memory grows by the
finished tree, not by the parse (docs/reliability.md). A child that crashes or is killed (out of
memory) is a failed load like a bad file: the last good config stays.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.forkserver
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ratelimit_svc.config import load_child
from ratelimit_svc.config.files import RuntimeLocation, load_from_files
from ratelimit_svc.config.load_child import SIZES, child_main
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.snapshot import decode
from ratelimit_svc.errors import ConfigError

_CONTEXT = multiprocessing.get_context("forkserver")


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A loaded config, and the same config encoded (config/snapshot.py), as worker processes
    are sent it."""

    config: RateLimitConfig
    pickled: bytes


async def load_in_child(
    location: RuntimeLocation, *, merge_domains: bool = False, fixed_windows_only: str = ""
) -> LoadedConfig | None:
    """``config.files.load_from_files`` in a child process: the config, None when there is no config
    directory configured, or ConfigError (a bad file, or a child that died). What the child
    logged is logged here, under the same logger names."""
    return await build_in_child(
        load_from_files,
        location,
        merge_domains=merge_domains,
        fixed_windows_only=fixed_windows_only,
    )


async def build_in_child(
    build: Callable[..., RateLimitConfig | None], *args: Any, **kwargs: Any
) -> LoadedConfig | None:
    """``build(*args, **kwargs)`` in a child process (``build`` and its arguments are pickled:
    a module-level function and plain values): what it returns, encoded there and decoded here a
    slice at a time; ConfigError for what it raises, or when the child dies before answering.
    The file loader and the xDS client (config/xds.py) both use it."""
    # The first use starts the fork server (a new interpreter importing this module and the
    # builder's): slow, so not on the event loop. Every later load forks a warm copy of it in
    # milliseconds, with no interpreter start and no imports. A fork server that has died
    # (killed, out of memory) is started again by ``ensure_running``.
    # Only the child's side (no asyncio): the fork server is idle most of its life.
    _CONTEXT.set_forkserver_preload([load_child.__name__, build.__module__])  # once it runs: none
    ours, theirs = socket.socketpair()
    process: Any = _CONTEXT.Process(
        target=child_main,
        args=(theirs, build, args, kwargs),
        name="ratelimit-config-load",
        daemon=True,
    )
    answer = None
    try:
        try:
            await asyncio.to_thread(multiprocessing.forkserver.ensure_running)
            # Also in a thread: start() waits for the fork server to answer with the pid, which
            # on a busy machine is not always at once.
            await asyncio.to_thread(process.start)
        except (OSError, EOFError) as exc:  # it died just now: the next load starts a new one
            raise ConfigError(f"the config load process could not be started: {exc}") from None
        finally:
            theirs.close()
        answer = await _receive(ours)
        if answer is not None:
            # Decoded at once: the child still frees its heap and exits meanwhile (at its low
            # priority, that took up to 0.1 s of a busy machine), and is reaped after.
            return await _answered(*answer)
    finally:
        ours.close()
        if answer is None and process.is_alive():  # cancelled (the service is stopping)
            process.kill()
        if process.pid is not None:  # started
            await asyncio.shield(asyncio.to_thread(process.join))
    code = process.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    raise ConfigError(
        f"the config load process (pid {process.pid}) {how} before answering"
        + (" (out of memory?)" if code == -9 else "")
    )


async def _answered(header: Any, payload: bytes) -> LoadedConfig | None:
    """What the child's answer says: its log records logged here, then the config decoded (a
    slice at a time), None, or the ConfigError it reported."""
    status, error, records = header
    for level, name, message in records:
        logging.getLogger(name).log(level, "%s", message)
    if status == "error":
        raise ConfigError(error)
    if status == "none":
        return None
    config = await decode(payload)
    assert config is not None  # the child sends "none" for no config
    return LoadedConfig(config, payload)


async def _receive(sock: socket.socket) -> tuple[Any, bytes] | None:
    """The child's answer: its header (status, error, log records) and the encoded config, or
    None when it closed its end first. Read into buffers of the announced sizes, chunk by chunk
    as the loop hands them over: a 13 MB snapshot is never joined or copied whole here."""
    sock.setblocking(False)
    sizes = await _read_exactly(sock, SIZES.size)
    if sizes is None:
        return None
    header_size, payload_size = SIZES.unpack(sizes)
    header = await _read_exactly(sock, header_size)
    payload = await _read_exactly(sock, payload_size)
    if header is None or payload is None:
        return None
    return pickle.loads(header), bytes(payload)


async def _read_exactly(sock: socket.socket, size: int) -> bytearray | None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        got = await loop.sock_recv_into(sock, view[done:])
        if not got:
            return None
        done += got
    view.release()
    return buffer
