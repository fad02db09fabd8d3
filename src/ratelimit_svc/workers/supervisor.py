"""Worker processes (WORKERS): the fork server, the pool of gRPC workers sharing GRPC_PORT, the
socket-pair link to each, and their replacement when one dies; handed its target, it knows nothing
of ``App`` (docs/operations.md (Workers)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol

from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.cpu_quota import usable_cpus
from ratelimit_svc.workers.resident import release_file_pages

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # before replacing a worker that died
STOP_MARGIN = 10.0  # beyond drain and grace, how long the primary waits for workers to exit
_FRAME = struct.Struct("!I")
# A message larger than this (a config) is unpickled in a thread, not on the event loop.
_THREAD_UNPICKLE_BYTES = 64 * 1024
_STATUS_UNKNOWN = 255  # multiprocessing's exit code for a worker whose fork server has gone


def worker_count(settings: Settings) -> int:
    """WORKERS, with 0 resolved: one per usable CPU (workers/cpu_quota.py) when the backend is
    shared and the port is TCP, else 1 (Settings has already refused an explicit count that
    cannot work)."""
    if settings.workers:
        return settings.workers
    if settings.backend_type == "memory" or settings.grpc_uds:
        return 1
    return usable_cpus()  # the cgroup's CPU quota, not the host's CPU count


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (measurably less CPU per request,
    docs/performance.md), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)




def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, held while the service runs: it fixes
    GRPC_PORT=0 to one port for every worker and keeps it ours while a worker restarts. It
    never listens, so it is given no connections. A port that anything else holds is refused
    (even another SO_REUSEPORT service of this user, which could otherwise share it silently)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SettingsError(
                f"cannot listen for gRPC on GRPC_HOST:GRPC_PORT {host}:{port}: {exc.strerror}"
            ) from None
        address = probe.getsockname()
    reservation = socket.socket(family, kind, proto)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind(address)
    return reservation



class WorkerTarget(Protocol):
    """A worker process's entry point (``roles.worker_main``): the supervisor only starts it."""

    __module__: str

    def __call__(
        self, env: dict[str, str], count: int, port: int, index: int, sock: socket.socket
    ) -> None: ...


class WorkerProcess(Protocol):
    """A started worker: a multiprocessing.Process, or an Envoy running one (servers/pyvoy.py)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    @property
    def sentinel(self) -> int: ...

    def kill(self) -> None: ...

    def join(self) -> None: ...


# Starts worker ``index`` (of ``settings.workers``, on ``settings.grpc_port``) linked by ``link``.
Spawn = Callable[[Settings, dict[str, str], int, socket.socket], WorkerProcess]


class Aggregate(Protocol):
    """Where the workers' stats reports go (``aggregation.AggregateStats``)."""

    def merge(
        self,
        worker: int,
        counters: Mapping[str, int],
        gauges: Mapping[str, int],
        timers: Mapping[str, list[float]],
    ) -> None: ...

    def forget(self, worker: int) -> None: ...


# -- the link between the primary and a worker ----------------------------------------------------


class Link:
    """Pickled messages over one end of a socket pair (each framed by its length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Link:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue ``message``; never blocks (the transport buffers). A config travels as bytes
        pickled beforehand (``App.pickled_config``): pickling it here would be the whole tree."""
        if self._writer.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_FRAME.pack(len(data)))
        self._writer.write(data)

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed."""
        try:
            (size,) = _FRAME.unpack(await self._reader.readexactly(_FRAME.size))
            data = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if size > _THREAD_UNPICKLE_BYTES:
            message: tuple[Any, ...] = await asyncio.to_thread(pickle.loads, data)
        else:
            message = pickle.loads(data)
        return message

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


# -- stats: what a worker reports, and their sum in the primary -----------------------------------






# -- the primary ----------------------------------------------------------------------------------


class WorkerPool:
    """The primary's workers: started from a fork server, linked, replaced when they die."""

    def __init__(
        self,
        settings: Settings,
        env: dict[str, str],
        count: int,
        *,
        target: WorkerTarget | None = None,
        spawn: Spawn | None = None,
        stop_grace: float,
    ) -> None:
        """Workers run ``target`` in a process forked from a fork server, or are started by
        ``spawn`` (pyvoy: an Envoy with the worker embedded)."""
        self.settings = settings
        self.env = env
        self.count = count
        self.stop_grace = stop_grace
        self._context = multiprocessing.get_context("forkserver")
        if spawn is None:
            assert target is not None
            self.target = target
            # Imported once in the fork server, so a worker starts from a warm copy.
            self._context.set_forkserver_preload([target.__module__])
        self._spawn_process: Spawn = spawn if spawn is not None else self._fork
        # pyvoy: the primary serves no gRPC, every worker does (workers/roles.py)
        self.only_workers_serve = spawn is not None
        self._processes: dict[int, WorkerProcess] = {}  # worker index -> its process
        self._sockets: dict[int, socket.socket] = {}  # the primary's end, until linked
        self._links: dict[int, Link] = {}
        self._ready: set[int] = set()
        self._pickled_config: Callable[[], Awaitable[bytes]] | None = None
        self._publishing = asyncio.Lock()  # configs reach each link in the order swapped in
        self._aggregate: Aggregate | None = None
        # worker index -> its last console report (backend line, hot keys; docs/console.md)
        self.console_reports: dict[int, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._all_exited = asyncio.Event()

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _fork(
        self, settings: Settings, env: dict[str, str], index: int, link: socket.socket
    ) -> WorkerProcess:
        process = self._context.Process(
            target=self.target,
            args=(env, settings.workers, settings.grpc_port, index, link),
            name=f"ratelimit-worker-{index}",
            daemon=True,  # should this process end without stopping it, it is terminated
        )
        process.start()
        return process

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        process = self._spawn_process(self.settings, self.env, index, theirs)
        theirs.close()
        self._processes[index] = process
        self._sockets[index] = ours
        log.info("started gRPC worker %d (pid %d)", index, process.pid)
        if self._aggregate is not None:
            self._watch(index)

    # -- running inside the primary's event loop --

    def attach(self, pickled_config: Callable[[], Awaitable[bytes]], aggregate: Aggregate) -> None:
        """Start talking to the workers: each gets the current config (``pickled_config()``,
        then again after each ``publish_config``) and sends its stats to ``aggregate``."""
        self._pickled_config = pickled_config
        self._aggregate = aggregate
        for index in list(self._processes):
            self._watch(index)

    def _watch(self, index: int) -> None:
        self._own(self._serve_link(index), f"link-{index}")

    def _own(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_config(self, links: Callable[[], Iterable[Link]]) -> None:
        """Send the current config to ``links()``: pickled off the event loop, and in order
        (a newer config waits for the lock, so it always arrives after an older one)."""
        assert self._pickled_config is not None
        async with self._publishing:
            pickled = await self._pickled_config()
            for link in links():
                link.send(("config", pickled))

    async def _serve_link(self, index: int) -> None:
        assert self._aggregate is not None
        aggregate = self._aggregate
        link = await Link.open(self._sockets.pop(index))
        self._links[index] = link
        await self._send_config(lambda: [link])
        try:
            while (message := await link.receive()) is not None:
                if message[0] == "stats":
                    aggregate.merge(index, *message[1:])
                elif message[0] == "console":
                    self.console_reports[index] = {"at": time.time(), **message[1]}
                elif message[0] == "ready":
                    self._on_ready(index, message[1])
        finally:
            self._links.pop(index, None)
            self.console_reports.pop(index, None)
            await link.close()
            aggregate.forget(index)
            self._ready.discard(index)
        await self._reap(index)

    def _on_ready(self, index: int, pid: int) -> None:
        self._ready.add(index)
        log.info("gRPC worker %d (pid %d) is serving", index, pid)
        if len(self._ready) == self.count:
            release_file_pages()  # started: what only starting touched (docs/performance.md)
            pids = ", ".join(str(self._processes[i].pid) for i in sorted(self._processes))
            if self.only_workers_serve:
                log.warning("gRPC workers: %d processes share port %d (Envoy (pyvoy) pids %s)",
                            self.count, self.settings.grpc_port, pids)
                log.warning("Listening for gRPC on '%s:%d'",
                            self.settings.grpc_host, self.settings.grpc_port)
                return
            log.warning(
                "gRPC workers: %d processes share port %d (this one, pid %d, and %s)",
                self.count + 1, self.settings.grpc_port, os.getpid(), pids,
            )  # fmt: skip

    async def _reap(self, index: int) -> None:
        """The link is closed: the worker has exited (or is about to). Replace it unless the
        service is stopping."""
        process = self._processes[index]
        try:
            async with asyncio.timeout(STOP_MARGIN):
                await _exited(process)
        except TimeoutError:  # closed its link but did not exit
            process.kill()
            await _exited(process)
        code = process.exitcode
        del self._processes[index]
        if self._stopping:
            if code == _STATUS_UNKNOWN:
                # SIGTERM to the whole process group stops the fork server too, and with it goes
                # the exit status it relays; the worker itself drained on the same signal.
                log.info("gRPC worker %d (pid %d) stopped", index, process.pid)
            elif code != 0:
                log.error("gRPC worker %d (pid %d) exited with %s", index, process.pid, code)
        else:
            log.error(
                "gRPC worker %d (pid %d) exited with %s; starting another in %gs",
                index, process.pid, code, RESTART_DELAY,
            )  # fmt: skip
            await asyncio.sleep(RESTART_DELAY)
            if not self._stopping:
                self._spawn(index)
        if self._stopping and not self._processes:
            self._all_exited.set()

    def publish_config(self, config: RateLimitConfig | None) -> None:
        """A config was swapped in: send it to every worker (from a task: pickling a big
        config, when the loader has not, takes a while). Before ``attach`` there is no link
        yet: each gets the config current when it opens."""
        if self._pickled_config is None:
            return
        self._own(self._send_config(lambda: list(self._links.values())), "publish-config")

    def stop(self) -> None:
        """Tell every worker to drain and exit (a message, not a signal: a worker that also got
        SIGTERM from its process group must not count it as a second, forcing signal)."""
        self._stopping = True
        if not self._processes:
            self._all_exited.set()
        self.tell_all(("stop",))

    def tell_all(self, message: tuple[Any, ...]) -> None:
        for link in self._links.values():
            link.send(message)

    async def wait_stopped(self) -> None:
        """Wait until every worker has exited (killing any that outlives its drain), so that
        their last stats are in before the primary's final flush."""
        self.stop()
        bound = self.settings.shutdown_drain_seconds + self.stop_grace + STOP_MARGIN
        try:
            async with asyncio.timeout(bound):
                await self._all_exited.wait()
        except TimeoutError:
            for index, process in list(self._processes.items()):
                log.error("gRPC worker %d (pid %d) did not stop: killing it", index, process.pid)
                process.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_MARGIN):
                    await self._all_exited.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._sockets.values():
            sock.close()


# -- a worker -------------------------------------------------------------------------------------








async def _exited(process: WorkerProcess) -> None:
    """Wait without blocking the loop until ``process`` has exited."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_sentinel() -> None:
        loop.remove_reader(process.sentinel)
        if not done.done():
            done.set_result(None)

    loop.add_reader(process.sentinel, on_sentinel)
    try:
        await done
    finally:
        loop.remove_reader(process.sentinel)
    process.join()

