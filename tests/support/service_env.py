"""Helpers shared by the operations tests: settings for an App on free ports, rule files, and a
subprocess service whose listening addresses are read from its log lines."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT = 30.0  # to start, or to exit once asked

RULES = """
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: minute, requests_per_unit: 2}
"""


def rules(domain: str, key: str = "key1", per_minute: int = 2) -> str:
    return (
        f"domain: {domain}\ndescriptors:\n  - key: {key}\n"
        f"    rate_limit: {{unit: minute, requests_per_unit: {per_minute}}}\n"
    )


def base_env(**extra: str) -> dict[str, str]:
    """Memory backend, every listener on 127.0.0.1 port 0, no statsd, no jitter."""
    env = {
        "BACKEND_TYPE": "memory",
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "DEBUG_HOST": "127.0.0.1",
        "DEBUG_PORT": "0",
        "USE_STATSD": "false",
        "EXPIRATION_JITTER_MAX_SECONDS": "0",
    }
    env.update(extra)
    return env


def write_rules(tmp_path: Path, text: str = RULES) -> dict[str, str]:
    """``config_dir_env`` without the directory: just the RUNTIME_* variables."""
    env, _ = config_dir_env(tmp_path, text)
    return env


def config_dir_env(tmp_path: Path, text: str | None = RULES) -> tuple[dict[str, str], Path]:
    """RUNTIME_* for ``tmp_path/runtime/ratelimit/config`` (with ``basic.yaml`` unless None)."""
    config_dir = tmp_path / "runtime" / "ratelimit" / "config"
    config_dir.mkdir(parents=True)
    if text is not None:
        (config_dir / "basic.yaml").write_text(text)
    env = {
        "RUNTIME_ROOT": str(tmp_path / "runtime"),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "RUNTIME_APPDIRECTORY": "config",
    }
    return env, config_dir


_LISTENING = re.compile(r"Listening for (\w+) on '([^']*):(\d+)'")


@dataclass
class ServiceProcess:
    """``python -m ratelimit_svc`` in its own session; ``ports`` maps gRPC/HTTP/debug to ports."""

    process: asyncio.subprocess.Process
    ports: dict[str, int]
    lines: list[str] = field(default_factory=list)

    @classmethod
    async def spawn(cls, env: dict[str, str]) -> ServiceProcess:
        """Start the process; do not wait for anything."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ratelimit_svc",
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        return cls(process, {})

    @classmethod
    async def start(cls, env: dict[str, str]) -> ServiceProcess:
        """Start the process and wait until its three listeners have logged their addresses."""
        service = await cls.spawn(env)
        try:
            while len(service.ports) < 3:
                line = await service.wait_for_line("Listening for ")
                if match := _LISTENING.search(line):
                    service.ports[match[1]] = int(match[3])
        except BaseException:
            await service.kill()
            raise
        return service

    async def wait_for_line(self, text: str) -> str:
        """Read the log until a line containing ``text``; fail if the process exits first."""
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while True:
                line = await self.readline()
                if not line:
                    raise AssertionError(f"exited before logging {text!r}:\n" + "".join(self.lines))
                if text in line:
                    return line

    async def readline(self) -> str:
        assert self.process.stderr is not None
        line = (await self.process.stderr.readline()).decode()
        if line:
            self.lines.append(line)
        return line

    async def wait(self) -> int:
        """Read the rest of the log and wait for the exit code."""
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while await self.readline():
                pass
            return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.wait()
