"""Reloads never stall serving (docs/reliability.md): the load runs in a child process while the
App keeps answering, a request sees the old or the new config and never a half-adopted one, a
load process or fork server that dies costs one load at most, files over CONFIG_MAX_FILE_BYTES
are refused by name, and a directory that cannot be read keeps the last good config (a real
service process that chmod 0 stops).

No test here measures time: "requests were answered while the load ran" is counted, not timed
(the speed targets are in scripts/bench_reload.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import load_builders
from support.load_builders import fork_server_pid
from support.service_env import ServiceProcess, base_env, rules

from ratelimit_svc.app import App
from ratelimit_svc.config import load_process, source
from ratelimit_svc.config.load_process import build_in_child
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.config.snapshot import SLICE_NODES
from ratelimit_svc.config.source import FileSource
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.settings.model import Settings


def big_rules(domain: str, count: int) -> str:
    lines = [f"domain: {domain}\ndescriptors:\n"]
    for i in range(count):
        lines.append(
            f"  - key: client\n    value: c{i}\n"
            "    rate_limit: {unit: minute, requests_per_unit: 5}\n"
        )
    return "".join(lines)


def settings_for(config_dir: Path, **extra: str) -> Settings:
    return Settings.from_env(
        base_env(
            RUNTIME_ROOT=str(config_dir.parent.parent),
            RUNTIME_SUBDIRECTORY=config_dir.parent.name,
            RUNTIME_APPDIRECTORY=config_dir.name,
            RUNTIME_WATCH_ROOT="false",
            **extra,
        )
    )


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "runtime" / "ratelimit" / "config"
    directory.mkdir(parents=True)
    (directory / "a.yaml").write_text(rules("alpha"))
    return directory


async def test_requests_are_answered_while_a_reload_runs(config_dir: Path) -> None:
    (config_dir / "big.yaml").write_text(big_rules("big", 2000))
    async with App(settings_for(config_dir)) as app:
        request = Request("alpha", (RequestDescriptor((("key1", ""),)),))
        loading = False
        answered_during_load = 0
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal answered_during_load
            while not stop.is_set():
                await app.service.should_rate_limit(request)
                answered_during_load += loading
                await asyncio.sleep(0)

        task = asyncio.create_task(client())
        await asyncio.sleep(0)
        loading = True
        assert isinstance(app.source, FileSource)
        result = app.source.load(app)  # a coroutine now; was a call that held the loop throughout
        if inspect.isawaitable(result):
            await result
        loading = False
        stop.set()
        await task
        assert app.config is not None and len(list(app.config.rules())) == 2001
        assert answered_during_load > 0


async def test_a_request_sees_the_old_or_the_new_config_never_a_half_adopted_one(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 5 * SLICE_NODES  # decoded in five slices, with the loop serving between them
    async with App(settings_for(config_dir)) as app:
        # The first and the last rule of the new config in one request: a tree adopted before
        # its last slice would limit the first descriptor and not the last.
        request = Request(
            "big",
            (
                RequestDescriptor((("client", "c0"),)),
                RequestDescriptor((("client", f"c{count - 1}"),)),
            ),
        )
        (config_dir / "big.yaml").write_text(big_rules("big", count))
        decoding = False
        decode = load_process.decode

        async def watched(data: bytes) -> RateLimitConfig | None:
            nonlocal decoding
            decoding = True
            try:
                return await decode(data)
            finally:
                decoding = False

        monkeypatch.setattr(load_process, "decode", watched)
        seen: list[tuple[bool, tuple[bool, ...]]] = []  # (while decoding, limited per descriptor)
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                decision = await app.service.should_rate_limit(request)
                seen.append((decoding, tuple(s.rule is not None for s in decision.statuses)))
                await asyncio.sleep(0)

        task = asyncio.create_task(client())
        assert isinstance(app.source, FileSource)
        await app.source.load(app)
        await asyncio.sleep(0)
        stop.set()
        await task
        assert {limited for _, limited in seen} <= {(False, False), (True, True)}
        assert [limited for during, limited in seen if during][:1] == [(False, False)]
        assert seen[-1][1] == (True, True)


async def test_a_load_process_that_dies_fails_that_load_only(
    config_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with App(settings_for(config_dir)) as app:
        good = app.config
        assert isinstance(app.source, FileSource)
        (config_dir / "b.yaml").write_text(rules("beta"))

        async def killed(*args: Any, **kwargs: Any) -> Any:  # SIGKILL mid-load, as out of memory
            return await build_in_child(load_builders.die)

        monkeypatch.setattr(source, "load_in_child", killed)
        with caplog.at_level(logging.INFO, logger="ratelimit_svc"):
            await app.source.load(app)
        assert app.config is good
        pattern = (
            r"Error loading new configuration: the config load process \(pid \d+\) was killed "
            r"by signal 9 before answering \(out of memory\?\)"
        )
        assert [m for m in caplog.messages if re.fullmatch(pattern, m)], caplog.messages
        assert app.stats.get("ratelimit.service.config_load_error") == 1
        monkeypatch.undo()
        await app.source.load(app)
        assert app.config is not None and set(app.config.domains) == {"alpha", "beta"}


async def test_a_fork_server_that_died_is_replaced_by_the_next_load(config_dir: Path) -> None:
    async with App(settings_for(config_dir)) as app:  # its first load started the fork server
        dead = fork_server_pid()
        exited = asyncio.Event()  # a pidfd turns readable when its process has exited
        pidfd = os.pidfd_open(dead)
        asyncio.get_running_loop().add_reader(pidfd, exited.set)
        try:
            os.kill(dead, signal.SIGKILL)
            async with asyncio.timeout(30):
                await exited.wait()  # a zombie now, until the next load reaps it
        finally:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        (config_dir / "b.yaml").write_text(rules("beta"))
        assert isinstance(app.source, FileSource)
        await app.source.load(app)
        assert app.config is not None and set(app.config.domains) == {"alpha", "beta"}
        assert fork_server_pid() != dead


async def test_the_fork_server_stays_without_asyncio(config_dir: Path) -> None:
    """It is idle most of its life, so it holds only the child's side of a load
    (config/load_child.py): no asyncio, ~13 MiB instead of ~16 (docs/performance.md#memory)."""
    async with App(settings_for(config_dir)) as app:  # its first load started the fork server
        assert app.config is not None
        maps = await asyncio.to_thread(Path(f"/proc/{fork_server_pid()}/maps").read_text)
    assert "_yaml" in maps  # the loader is preloaded: its C parser is mapped
    assert "_asyncio" not in maps


async def test_a_file_over_the_size_cap_keeps_the_last_config(
    config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with App(settings_for(config_dir, CONFIG_MAX_FILE_BYTES="4096")) as app:
        good = app.config
        (config_dir / "big.yaml").write_text(big_rules("big", 100))
        with caplog.at_level(logging.INFO, logger="ratelimit_svc"):
            assert isinstance(app.source, FileSource)
            await app.source.load(app)
        assert app.config is good
        size = (config_dir / "big.yaml").stat().st_size
        assert (
            "Error loading new configuration: big.yaml: error loading config file: larger than "
            f"CONFIG_MAX_FILE_BYTES ({size} > 4096 bytes)"
        ) in caplog.messages
        assert app.stats.get("ratelimit.service.config_load_error") == 1


# -- a config directory that cannot be read ------------------------------------------------------


def without_dac_override() -> list[str]:
    """A command prefix under which chmod 0 stops this user: none needed unless root, whose
    CAP_DAC_OVERRIDE reads anything; setpriv drops it (and CAP_DAC_READ_SEARCH) for the child."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: chmod 0 cannot stop root from reading")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


class UnprivilegedService(ServiceProcess):
    """The service as an operator runs it: a user that chmod 0 does stop."""

    @classmethod
    async def spawn(cls, env: dict[str, str]) -> ServiceProcess:
        process = await asyncio.create_subprocess_exec(
            *without_dac_override(), sys.executable, "-m", "ratelimit_svc",
            env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        return cls(process, {})


async def rlconfig(port: int) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/rlconfig") as answer:
            return await answer.text()


@pytest.mark.parametrize("unreadable", ["team", "."], ids=["subdirectory", "config-directory"])
async def test_an_unreadable_directory_keeps_the_last_config(
    config_dir: Path, unreadable: str
) -> None:
    (config_dir / "team").mkdir()
    (config_dir / "team" / "b.yaml").write_text(rules("beta"))
    env = base_env(
        RUNTIME_ROOT=str(config_dir.parent.parent), RUNTIME_SUBDIRECTORY="ratelimit",
        RUNTIME_APPDIRECTORY="config", RUNTIME_WATCH_ROOT="false", LOG_LEVEL="INFO",
    )  # fmt: skip
    service = await UnprivilegedService.start(env)
    target = config_dir / unreadable if unreadable != "." else config_dir
    try:
        before = await rlconfig(service.ports["debug"])
        assert "alpha.key1" in before and "beta.key1" in before
        target.chmod(0)
        line = await service.wait_for_line("Error loading new configuration")
        if unreadable == ".":
            assert f"config directory {target} cannot be read by this user" in line, line
        else:
            assert f"config directory {target} cannot be read: Permission denied" in line, line
        assert await rlconfig(service.ports["debug"]) == before
        target.chmod(0o755)
        await service.wait_for_line("Successfully loaded new configuration")
    finally:
        target.chmod(0o755)
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait() == 0
