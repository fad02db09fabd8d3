"""Process hygiene (docs/reliability.md), on real service processes: the open-file limit is
raised at startup, SIGHUP drains like SIGTERM, SIGUSR1 logs a status line and SIGUSR2 changes
nothing (also sent to a whole WORKERS=2 process group: the fork server and the workers survive;
the signal tests on both gRPC transports, docs/transports.md), idle HTTP connections are
closed after HTTP_IDLE_TIMEOUT, and a killed service leaves no Envoy running."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from support.redis_fixtures import RedisServer
from support.service_env import ServiceProcess, base_env, config_dir_env

LOW_SOFT_LIMIT = 256
# The signals are handled by the outer process on pyvoy, by the service's own loop on grpcio.
TRANSPORTS = pytest.mark.parametrize("transport", ["pyvoy", "grpcio"])


class LowFileLimitService(ServiceProcess):
    """Started with a soft RLIMIT_NOFILE of 256 (the hard limit as this process has it)."""

    @classmethod
    async def spawn(cls, env: dict[str, str]) -> ServiceProcess:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard))

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ratelimit_svc",
            env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, preexec_fn=lower,
        )  # fmt: skip
        return cls(process, {})


def open_file_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' line")


async def healthcheck(port: int) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthcheck") as answer:
            return answer.status


async def stop(service: ServiceProcess) -> int:
    service.process.send_signal(signal.SIGTERM)
    return await service.wait()


async def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    runtime, _ = config_dir_env(tmp_path)
    service = await LowFileLimitService.start(base_env(**runtime, LOG_LEVEL="INFO"))
    try:
        soft, hard = open_file_limits(service.process.pid)
        assert soft == hard or (hard == "unlimited" and int(soft) > LOW_SOFT_LIMIT), (soft, hard)
        assert any(f"open-file limit (RLIMIT_NOFILE) from {LOW_SOFT_LIMIT} to {soft}" in line for line in service.lines)
    finally:
        assert await stop(service) == 0


@TRANSPORTS
async def test_sighup_drains_like_sigterm(tmp_path: Path, transport: str) -> None:
    runtime, _ = config_dir_env(tmp_path)
    service = await ServiceProcess.start(
        base_env(**runtime, SHUTDOWN_DRAIN_SECONDS="1", LOG_LEVEL="INFO", GRPC_SERVER=transport)
    )
    await service.wait_for_line("started (pid")  # a signal during startup cancels it instead
    service.process.send_signal(signal.SIGHUP)
    await service.wait_for_line("signal received: shutting down (SIGHUP)")
    await service.wait_for_line("draining for 1s")
    assert await service.wait() == 0


@TRANSPORTS
async def test_sigusr1_logs_a_status_line_and_sigusr2_changes_nothing(tmp_path: Path, transport: str) -> None:
    runtime, _ = config_dir_env(tmp_path)
    service = await ServiceProcess.start(base_env(**runtime, GRPC_SERVER=transport))
    try:
        service.process.send_signal(signal.SIGUSR1)
        line = await service.wait_for_line("status (SIGUSR1)")
        assert f"pid {service.process.pid}, healthy, 1 domains" in line, line
        service.process.send_signal(signal.SIGUSR2)
        service.process.send_signal(signal.SIGUSR1)  # still serving signals after USR2
        await service.wait_for_line("status (SIGUSR1)")
        assert await healthcheck(service.ports["HTTP"]) == 200
    finally:
        assert await stop(service) == 0


@TRANSPORTS
async def test_user_signals_to_a_worker_group_kill_nothing(
    tmp_path: Path, redis_db: RedisServer, transport: str
) -> None:
    """A ``kill -USR1 -<pgid>`` reaches the primary, the workers and the fork server alike."""
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url,
        WORKERS="2", LOG_LEVEL="INFO", GRPC_SERVER=transport,
    )  # fmt: skip
    service = await ServiceProcess.start(env)
    group = service.process.pid
    try:
        if not any("gRPC workers:" in line for line in service.lines):  # pyvoy: logged already
            await service.wait_for_line("gRPC workers:")
        os.killpg(group, signal.SIGUSR2)
        os.killpg(group, signal.SIGUSR1)
        # Every process logs one: grpcio's primary and forked worker got the signal; pyvoy's
        # primary got it and asked its two Envoy workers (in sessions of their own) for theirs.
        for _ in range(2 if transport == "grpcio" else 3):
            await service.wait_for_line("status (SIGUSR1)")
        assert await healthcheck(service.ports["HTTP"]) == 200
        assert not any("exited with" in line for line in service.lines), service.lines
    finally:
        os.killpg(group, signal.SIGTERM)
        assert await service.wait() == 0
    assert not any("exited with" in line for line in service.lines), service.lines


@pytest.mark.parametrize("after_a_request", [False, True], ids=["silent", "keep-alive"])
async def test_idle_http_connections_are_closed(tmp_path: Path, after_a_request: bool) -> None:
    runtime, _ = config_dir_env(tmp_path)
    service = await ServiceProcess.start(base_env(**runtime, HTTP_IDLE_TIMEOUT="1s"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["HTTP"])
        if after_a_request:
            writer.write(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        async with asyncio.timeout(30):  # generous: the setting is 1 s
            while await reader.read(4096):
                pass
        writer.close()
    finally:
        assert await stop(service) == 0


def envoy_child(pid: int) -> int | None:
    """The Envoy the service (pyvoy) started, once it has."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        for child in (thread / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "envoy":
                return int(child)
    return None


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_killed_service_leaves_no_envoy_even_with_its_lines_unread(tmp_path: Path) -> None:
    """SIGKILL of the service while Envoy's app has told it things it has not read yet (it is
    stopped): the kernel resets the control socket instead of closing it, and Envoy, which nobody
    will stop now, stops itself. It used to keep running, orphaned, for ever."""
    env, _ = config_dir_env(tmp_path)
    service = await ServiceProcess.spawn(base_env(**env, GRPC_SERVER="pyvoy"))
    envoy = None
    try:
        async with asyncio.timeout(30):
            while (envoy := envoy_child(service.process.pid)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        service.process.send_signal(signal.SIGSTOP)  # reads nothing from now on
        await service.wait_for_line("Listening for debug")  # Envoy's app has started...
        await asyncio.sleep(1)  # ...and said so to the stopped service
        service.process.kill()
        async with asyncio.timeout(30):
            while running(envoy):  # noqa: ASYNC110 (not our child: nothing to wait on)
                await asyncio.sleep(0.1)
    finally:
        if envoy is not None and running(envoy):  # the failure: do not leave it behind too
            os.kill(envoy, signal.SIGKILL)
        await service.kill()
