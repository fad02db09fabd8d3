"""The e2e tests' handles on running processes: ``Stacks`` starts services and Envoys (through
scripts/stack.py, which the demo uses too), ``EnvoyStack`` is the shared stack the route tests
send requests through; ``make_upstream`` is the demo's echo upstream (scripts/upstream.py). The
fixtures that create them are in conftest.py.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from support.redis_fixtures import RedisServer

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import stack  # noqa: E402
from envoy_config import EnvoyParams  # noqa: E402
from upstream import make_server as make_upstream  # noqa: E402

from .client import Reply, request  # noqa: E402

__all__ = ["CONFIG_DIR", "EnvoyStack", "Stacks", "make_upstream"]


class Stacks:
    """Starts services and Envoys in one directory; ``close`` stops them, newest first."""

    def __init__(self, workdir: Path, upstream_port: int, transport: str = "pyvoy") -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.transport = transport  # GRPC_SERVER of every service started here
        self.processes: list[stack.Process] = []

    def service(
        self,
        config_dir: Path = CONFIG_DIR,
        *,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> stack.Service:
        settings = {
            "EXPIRATION_JITTER_MAX_SECONDS": "0", "GRPC_SERVER": self.transport, **(env or {})
        }  # fmt: skip
        service = stack.start_service(self.workdir, config_dir, redis_url=redis_url, env=settings)
        self.processes.append(service.process)
        log = service.process.log_text()
        on_pyvoy = "pyvoy" in log and "using grpcio instead" not in log
        assert on_pyvoy == (self.transport == "pyvoy"), log  # no silent fallback
        return service

    def envoy(
        self, service: stack.Service, *, failure_mode_deny: bool = False, name: str = "envoy"
    ) -> stack.Envoy:
        params = EnvoyParams(
            listen_port=0,
            admin_port=0,
            ratelimit_port=service.grpc_port,
            upstream_port=self.upstream_port,
            failure_mode_deny=failure_mode_deny,
        )
        envoy = stack.start_envoy(self.workdir, params, name=name)
        self.processes.append(envoy.process)
        return envoy

    def log_tails(self) -> list[tuple[str, str]]:
        return [(f"{p.name} log ({p.log_path})", p.tail(40)) for p in self.processes]

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


class EnvoyStack:
    """The shared stack: ``get`` sends a request through Envoy."""

    def __init__(self, stacks: Stacks, envoy: stack.Envoy, redis: RedisServer | None) -> None:
        self.stacks = stacks
        self.envoy = envoy
        self.redis = redis

    @property
    def port(self) -> int:
        return self.envoy.port

    def get(self, path: str, **kwargs: object) -> Reply:
        return request(self.envoy.port, path, **kwargs)  # type: ignore[arg-type]

    def log_tails(self) -> list[tuple[str, str]]:
        return self.stacks.log_tails()
