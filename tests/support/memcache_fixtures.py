"""Real memcached servers for tests (Debian's ``memcached``; tests skip with a reason without it).

Each server listens on 127.0.0.1 on a free port (a collision is retried with a new port), with UDP
off; ``tls=True`` starts it with ``-Z`` and certificates made by trustme (``TlsFiles`` from
tests/support/redis_fixtures.py). The fixtures wait until ``version`` answers and kill the process at
teardown.

Fixtures:
- ``memcached_server`` (session): one plain server; ``flush()`` empties it.
- ``memcached_factory`` (function): ``factory(tls=False, verify_clients=False, tls_hostnames=...)``
  starts more; all are killed at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from support.redis_fixtures import HOST, TlsFiles, free_port, suspend

START_TIMEOUT_SECONDS = 10.0


def find_memcached() -> str | None:
    return os.environ.get("RATELIMIT_TEST_MEMCACHED") or shutil.which("memcached") or (
        "/usr/bin/memcached" if os.access("/usr/bin/memcached", os.X_OK) else None
    )


class MemcachedServer:
    def __init__(
        self,
        binary: str,
        *,
        tls: bool = False,
        verify_clients: bool = False,
        tls_hostnames: tuple[str, ...] = ("localhost", HOST),
    ) -> None:
        self.binary = binary
        self.host = HOST
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="rl-memcached-"))
        self.tls_files = TlsFiles.create(self.dir, tls_hostnames) if tls else None
        self.verify_clients = verify_clients
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _args(self) -> list[str]:
        args = [self.binary, "-l", self.host, "-p", str(self.port), "-U", "0", "-m", "64", "-t", "2"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without it
        if self.tls_files is not None:
            files = self.tls_files
            options = [
                f"ssl_chain_cert={files.server_cert}",
                f"ssl_key={files.server_key}",
                f"ssl_ca_cert={files.ca}",
                # 3 = the client must present a certificate the CA signed
                f"ssl_verify_mode={3 if self.verify_clients else 0}",
            ]
            args += ["-Z", "-o", ",".join(options)]
        return args

    def start(self) -> None:
        for _ in range(20):
            self.port = free_port()
            self._output = open(self.dir / "memcached.log", "ab")  # closed in kill()
            self._process = subprocess.Popen(
                self._args(), stdout=self._output, stderr=subprocess.STDOUT, cwd=self.dir
            )
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    break
                if self._answers():
                    return
                time.sleep(0.01)  # startup poll, not a test wait
            log = self.log_tail()
            self.kill()
            if "Address already in use" not in log and "bind" not in log:
                raise RuntimeError(f"memcached did not start:\n{log}")
        raise RuntimeError("memcached could not bind a port")

    def _answers(self) -> bool:
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(socket.create_connection((self.host, self.port), timeout=1))
                if self.tls_files is not None:
                    context = ssl.create_default_context(cafile=str(self.tls_files.ca))
                    context.load_cert_chain(
                        str(self.tls_files.client_cert), str(self.tls_files.client_key)
                    )
                    context.check_hostname = False  # any name: this only asks "are you up?"
                    sock = stack.enter_context(context.wrap_socket(sock))
                sock.sendall(b"version\r\n")
                return sock.recv(100).startswith(b"VERSION")
        except OSError:
            return False

    def command(self, line: str, until: bytes = b"\r\n") -> bytes:
        """One plain-text command (not for TLS servers); the raw reply, read up to ``until``."""
        assert self.tls_files is None
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall(line.encode() + b"\r\n")
            reply = b""
            while not reply.endswith(until):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def get(self, key: str) -> bytes | None:
        reply = self.command(f"get {key}", until=b"END\r\n")
        return None if reply == b"END\r\n" else reply.split(b"\r\n")[1]

    def stats(self) -> dict[str, str]:
        lines = self.command("stats", until=b"END\r\n").decode().splitlines()
        return {p[1]: p[2] for p in (line.split(" ", 2) for line in lines) if p[0] == "STAT"}

    def flush(self) -> None:
        assert self.command("flush_all") == b"OK\r\n"

    def stop(self) -> None:
        assert self._process is not None
        suspend(self._process)

    def cont(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            self._process.wait()
            self._process = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "memcached.log").read_text(errors="replace")[-2000:]
        return ""

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _binary_or_skip() -> str:
    binary = find_memcached()
    if binary is None:
        pytest.skip("no memcached binary: install Debian's memcached (apt-get install memcached)")
    return binary


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedServer]:
    server = MemcachedServer(_binary_or_skip())
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def memcached_factory() -> Iterator[Callable[..., MemcachedServer]]:
    servers: list[MemcachedServer] = []

    def factory(**options: Any) -> MemcachedServer:
        server = MemcachedServer(_binary_or_skip(), **options)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.close()
