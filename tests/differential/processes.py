"""The two services of a differential run, each on its own real redis-server.

The reference is envoyproxy/ratelimit's ``service_cmd`` at the pinned version (REFERENCE_VERSION
below), found at $RATELIMIT_REFERENCE_BIN, else in Go's bin directory, else installed with
``go install`` when Go is at hand (/usr/local/go/bin/go or on PATH); ``find_reference`` returns
None, with the reason, where neither works and the tier is skipped. ratelimit-svc runs as
``python -m ratelimit_svc``. Both get the same settings (every listener on 127.0.0.1, stats off,
no expiry jitter) plus a profile's own, and read the same rule files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from support.redis_fixtures import RedisServer, find_redis_server, free_port

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_MODULE = "github.com/envoyproxy/ratelimit/src/service_cmd"
REFERENCE_VERSION = "v1.4.1-0.20260122083618-3fb702589d36"
START_TIMEOUT = 60.0


def _go() -> str | None:
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_reference() -> tuple[str | None, str]:
    """(path of the reference binary, "") or (None, why not)."""
    explicit = os.environ.get("RATELIMIT_REFERENCE_BIN")
    if explicit:
        return (explicit, "") if os.access(explicit, os.X_OK) else (None, f"{explicit} missing")
    go = _go()
    gobin = None
    if go is not None:
        found = subprocess.run(
            [go, "env", "GOBIN", "GOPATH"], capture_output=True, text=True, check=False
        ).stdout.split("\n")
        gobin = found[0].strip() or (Path(found[1].strip()) / "bin").as_posix()
    for directory in filter(None, [gobin, str(Path.home() / "go" / "bin"), "/root/go/bin"]):
        binary = Path(directory) / "service_cmd"
        if os.access(binary, os.X_OK) and _is_pinned(go, binary):
            return str(binary), ""
    if go is None:
        return None, "Go is not installed (looked on PATH and at /usr/local/go/bin/go)"
    built = subprocess.run(
        [go, "install", f"{REFERENCE_MODULE}@{REFERENCE_VERSION}"],
        capture_output=True, text=True, check=False, timeout=1800,
    )  # fmt: skip
    if built.returncode != 0:
        return None, f"go install of the reference failed: {built.stderr.strip()[-400:]}"
    binary = Path(gobin or Path.home() / "go" / "bin") / "service_cmd"
    return (str(binary), "") if binary.exists() else (None, f"{binary} was not built")


def _is_pinned(go: str | None, binary: Path) -> bool:
    if go is None:
        return True  # cannot tell; take it
    info = subprocess.run(
        [go, "version", "-m", str(binary)], capture_output=True, text=True, check=False
    ).stdout
    return REFERENCE_VERSION in info


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log: Path
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/healthcheck", timeout=2
                ):
                    break
            except urllib.error.HTTPError:
                break  # answering, even if unhealthy (no config loaded)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not start:\n{self.tail()}") from None
                time.sleep(0.05)
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def common_env(runtime_root: Path, redis_url: str) -> dict[str, str]:
    return {
        "RUNTIME_ROOT": str(runtime_root),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "RUNTIME_APPDIRECTORY": "config",
        "BACKEND_TYPE": "redis",
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_TYPE": "SINGLE",
        "REDIS_URL": redis_url,
        "USE_STATSD": "false",
        "EXPIRATION_JITTER_MAX_SECONDS": "0",
        "HOST": "127.0.0.1",
        "GRPC_HOST": "127.0.0.1",
        "DEBUG_HOST": "127.0.0.1",
        "LOG_LEVEL": "warn",
        "WORKERS": "1",  # one local over-limit cache, as the reference has
    }


def spawn_service(name: str, command: list[str], env: dict[str, str], log: Path) -> Service:
    """Start the process; ``Service.wait_ready`` waits for it to answer."""
    grpc_port, http_port, debug_port = free_port(), free_port(), free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "RUNTIME_"))},
        **env,
        "GRPC_PORT": str(grpc_port),
        "PORT": str(http_port),
        "DEBUG_PORT": str(debug_port),
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=full_env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    return Service(name, process, grpc_port, http_port, log)


@dataclass
class Pair:
    """The reference and ratelimit-svc, each with its own Redis and rule directory."""

    reference: Service
    ours: Service
    reference_redis: RedisServer
    our_redis: RedisServer


@contextlib.contextmanager
def redis_pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError("no redis-server binary")
    first, second = RedisServer(binary), RedisServer(binary)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.close()
        second.close()


@contextlib.contextmanager
def service_pair(
    reference_binary: str,
    redises: tuple[RedisServer, RedisServer],
    files: dict[str, str],
    settings: dict[str, str],
    workdir: Path,
) -> Iterator[Pair]:
    """Both services on freshly flushed Redis servers, reading ``files`` (name -> YAML)."""
    services: list[Service] = []
    try:
        for redis_server in redises:
            redis_server.client().flushall()
        for name, redis_server in zip(("reference", "ours"), redises, strict=True):
            root = workdir / name / "runtime"
            config_dir = root / "ratelimit" / "config"
            config_dir.mkdir(parents=True)
            for file_name, text in files.items():
                (config_dir / file_name).write_text(text, encoding="utf-8")
            env = {**common_env(root, redis_server.url), **settings}
            command = (
                [reference_binary]
                if name == "reference"
                else [sys.executable, "-m", "ratelimit_svc"]
            )
            services.append(spawn_service(name, command, env, workdir / f"{name}.log"))
        for service in services:  # both start at once: the waits overlap
            service.wait_ready()
        yield Pair(services[0], services[1], redises[0], redises[1])
    finally:
        for service in services:
            service.stop()


if __name__ == "__main__":  # `make reference`
    found, reason = find_reference()
    print(f"reference: {found}" if found else f"reference unavailable ({reason}): "
          "tests/differential will be skipped")
