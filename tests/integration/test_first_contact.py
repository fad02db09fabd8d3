"""What a new user meets first (docs/deployment.md (First contact)): a port in use, an unreachable
Redis, an unreadable config directory each give one clear line and no traceback; the libraries log
at WARNING unless LOG_LEVEL=TRACE; a log file inside the config directory is neither loaded nor a
reason to reload; editor swap and backup files are skipped with `make run`'s settings, and under
the reference's defaults the failing load names the file and the settings that skip it."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support.redis_fixtures import free_port
from support.service_env import ROOT, RULES, ServiceProcess, base_env, config_dir_env

from ratelimit_svc.app import App
from ratelimit_svc.config.source import FileSource
from ratelimit_svc.config.watch import ConfigWatcher
from ratelimit_svc.settings.model import Settings

EDITOR_FILES = {
    ".basic.yaml.swp": b"b0VIM 9.0\x00\x00\x00\xff\xfe",  # vim's swap file
    "basic.yaml~": b"domain: [broken\n",  # a backup of an older, broken version
    ".#basic.yaml": b"user@host.1234:1700000000",  # emacs' lock file
    "4913": b"",  # vim's probe of whether it may write the directory
}


def make_run_environment() -> dict[str, str]:
    """RUNTIME_IGNOREDOTFILES and RUNTIME_IGNORE_PATTERNS exactly as the Makefile sets them."""
    makefile = (ROOT / "Makefile").read_text()
    found = dict(re.findall(r"^export (RUNTIME_IGNORE\w+) \?= (.*)$", makefile, flags=re.M))
    found["RUNTIME_IGNORE_PATTERNS"] = found["RUNTIME_IGNORE_PATTERNS"].replace("\\#", "#")
    assert set(found) == {"RUNTIME_IGNOREDOTFILES", "RUNTIME_IGNORE_PATTERNS"}
    return found


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def error_lines(service: ServiceProcess) -> list[str]:
    return [line for line in service.lines if " ERROR " in line]


@pytest.mark.parametrize(
    ("variable", "what", "setting"),
    [("PORT", "HTTP", "HOST/PORT"), ("GRPC_PORT", "gRPC", "GRPC_HOST/GRPC_PORT"),
     ("DEBUG_PORT", "debug", "DEBUG_HOST/DEBUG_PORT")],
)  # fmt: skip
async def test_a_port_in_use_is_one_clear_line(
    tmp_path: Path, busy_port: int, variable: str, what: str, setting: str
) -> None:
    runtime, _ = config_dir_env(tmp_path)
    service = await ServiceProcess.spawn(base_env(**runtime, **{variable: str(busy_port)}))
    assert await service.wait() == 1
    (line,) = error_lines(service)
    assert line.rstrip().endswith(
        f"cannot listen for {what} on 127.0.0.1:{busy_port}: Address already in use "
        f"(another process holds it? choose another with {setting})"
    )
    assert not any("Traceback" in line for line in service.lines), "".join(service.lines)


async def test_unreachable_redis_says_what_it_waits_for(tmp_path: Path) -> None:
    runtime, _ = config_dir_env(tmp_path)
    port = free_port()  # nothing listens there
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=f"127.0.0.1:{port}",
        REDIS_STARTUP_INITIAL_INTERVAL="100ms", REDIS_STARTUP_MAX_ELAPSED_TIME="1s",
    )  # fmt: skip
    service = await ServiceProcess.spawn(env)
    assert await service.wait() == 1
    retries = [line for line in service.lines if "redis not ready" in line]
    assert retries, "".join(service.lines)
    assert f"waiting for 127.0.0.1:{port} to answer PING before serving, next try in 0.1s" in retries[0]
    assert "giving up" in retries[0]
    (line,) = error_lines(service)
    assert "gave up after" in line and f"127.0.0.1:{port}" in line
    assert not any("Traceback" in line for line in service.lines)


async def test_redis_wait_without_a_limit_says_how_to_set_one(tmp_path: Path) -> None:
    runtime, _ = config_dir_env(tmp_path)
    env = base_env(
        **runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=f"127.0.0.1:{free_port()}",
        REDIS_STARTUP_INITIAL_INTERVAL="100ms",
    )  # fmt: skip
    service = await ServiceProcess.spawn(env)
    try:
        line = await service.wait_for_line("redis not ready (attempt 1)")
        assert "(no time limit: REDIS_STARTUP_MAX_ELAPSED_TIME sets one)" in line
    finally:
        await service.kill()


@pytest.mark.parametrize("problem", ["not-a-directory", "unreadable"])
async def test_an_unreadable_config_directory_is_one_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    runtime, config_dir = config_dir_env(tmp_path)
    if problem == "not-a-directory":
        (config_dir / "basic.yaml").unlink()
        config_dir.rmdir()
        config_dir.write_text("I am a file")
        expected = f"config directory {config_dir} is not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads every directory: checked as another user only")
        config_dir.chmod(0)
        expected = f"config directory {config_dir} cannot be read by this user"
    try:
        with caplog.at_level(logging.ERROR, logger="ratelimit_svc"):
            async with App(Settings.from_env(base_env(**runtime))) as app:
                assert app.config is None
    finally:
        if config_dir.is_dir():
            config_dir.chmod(0o755)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == f"Error loading new configuration: {expected}" or (
        record.getMessage().startswith(f"Error loading new configuration: {expected}")
    )
    assert "\n" not in record.getMessage() and record.exc_info is None


@pytest.mark.parametrize("transport", ["pyvoy", "grpcio"])
async def test_libraries_log_at_warning_unless_trace(tmp_path: Path, transport: str) -> None:
    """grpc's records on grpcio; Envoy's, relayed as ``envoy.*``, on pyvoy (docs/transports.md)."""
    runtime, _ = config_dir_env(tmp_path)
    shown = {}
    for level in ("DEBUG", "TRACE"):
        service = await ServiceProcess.start(base_env(**runtime, LOG_LEVEL=level, GRPC_SERVER=transport))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{service.ports['HTTP']}/healthcheck") as answer:
                assert answer.status == 200
        await service.kill()
        debug_loggers = {
            match[1] for line in service.lines if (match := re.search(r" DEBUG (\S+): ", line))
        }
        shown[level] = {name for name in debug_loggers if not name.startswith("ratelimit_svc")}
    assert shown["DEBUG"] == set(), shown["DEBUG"]
    assert shown["TRACE"], "LOG_LEVEL=TRACE shows the libraries' debug records"


async def test_a_log_file_in_the_config_directory_never_loads_or_reloads(tmp_path: Path) -> None:
    """`make run > config/run.log`: the log is neither rules nor a change to react to."""
    runtime, config_dir = config_dir_env(tmp_path)
    log_path = config_dir / "run.log"
    env = {**os.environ, **base_env(**runtime, LOG_LEVEL="DEBUG", RUNTIME_WATCH_ROOT="false")}
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ratelimit_svc", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file, stderr=log_file, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    try:
        debug_port = await _port_from_log(log_path, "debug")
        for _ in range(20):  # a busy log: every line is another write to the file
            await _stats(debug_port)
        (config_dir / "basic.yaml").write_text(RULES.replace("2}", "3}"))  # a real edit
        stats = await _wait_for(debug_port, "ratelimit.service.config_load_success", 2)
        await asyncio.sleep(2.5)  # longer than the watcher's coalescing window (2 s at most)
        stats = await _stats(debug_port)
        assert stats["ratelimit.service.config_load_success"] == 2
        assert stats.get("ratelimit.service.config_load_error", 0) == 0
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    assert "Error loading" not in log_path.read_text()


async def _port_from_log(path: Path, what: str) -> int:
    """The port the service logged, polling the file (it only grows; no event to wait on)."""
    pattern = re.compile(rf"Listening for {what} on '[^']*:(\d+)'")
    async with asyncio.timeout(30):
        while not (match := pattern.search(await asyncio.to_thread(path.read_text))):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return int(match[1])


async def _stats(port: int) -> dict[str, int]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/stats") as answer:
            text = await answer.text()
    return {name: int(value) for name, value in (line.split(": ") for line in text.splitlines())}


async def _wait_for(port: int, name: str, value: int) -> dict[str, int]:
    async with asyncio.timeout(30):
        while (stats := await _stats(port)).get(name, 0) < value:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return stats


async def test_editor_files_are_skipped_with_make_run_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, config_dir = config_dir_env(tmp_path)
    for name, data in EDITOR_FILES.items():
        (config_dir / name).write_bytes(data)
    settings = Settings.from_env(base_env(**runtime, **make_run_environment()))
    with caplog.at_level(logging.INFO, logger="ratelimit_svc"):
        async with App(settings) as app:
            assert isinstance(app.source, FileSource)
            assert app.config is not None and set(app.config.domains) == {"basic"}
            await app.source.load(app)  # a reload
            # Nor is a write to one of them a reason to reload (dot-files still are: a
            # ConfigMap's ..data swap is one).
            watcher = ConfigWatcher(app.source.location, watch_root=False, reload=lambda: None)
            for name in EDITOR_FILES:
                if not name.startswith("."):
                    assert watcher._ignored(str(config_dir / name)), name
            assert not watcher._ignored(str(config_dir / "basic.yaml"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("Successfully loaded" in r.getMessage() for r in caplog.records) == 2


async def test_under_the_references_defaults_a_swap_file_is_named_with_the_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, config_dir = config_dir_env(tmp_path)
    async with App(Settings.from_env(base_env(**runtime))) as app:
        assert isinstance(app.source, FileSource)
        with caplog.at_level(logging.ERROR, logger="ratelimit_svc"):
            (config_dir / "basic.yaml~").write_bytes(EDITOR_FILES["basic.yaml~"])
            await app.source.load(app)
            (config_dir / "basic.yaml~").unlink()
            (config_dir / ".basic.yaml.swp").write_bytes(EDITOR_FILES[".basic.yaml.swp"])
            await app.source.load(app)
        assert app.config is not None and set(app.config.domains) == {"basic"}  # kept
    # The watcher may load the same states again on its own: each state's error, once, in order.
    errors = dict.fromkeys(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    first, second = errors
    for message, name in ((first, "basic.yaml~"), (second, ".basic.yaml.swp")):
        assert message.startswith(f"Error loading new configuration: {name}: ")
        assert f"({name} looks like an editor's swap or backup file, not rules:" in message
        assert "RUNTIME_IGNOREDOTFILES=true skips dot-files" in message
        assert "RUNTIME_IGNORE_PATTERNS=" in message
