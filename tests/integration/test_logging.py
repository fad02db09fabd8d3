"""LOG_LEVEL, LOG_FORMAT=json, credentials redacted, and nothing logged per request above DEBUG."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.service_env import base_env, write_rules
from test_grpc import RULES as GRPC_RULES
from test_grpc import descriptor, free_port, start_process

from ratelimit_svc.app import App
from ratelimit_svc.logsetup import RedactFilter, configure_logging
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

log = logging.getLogger("ratelimit_svc.test")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def configured(**env: str) -> io.StringIO:
    """Logging as the service sets it up, into a string (use with the restore_root fixture)."""
    stream = io.StringIO()
    configure_logging(Settings.from_env(env), stream)
    return stream


def test_json_lines_have_the_reference_keys(restore_root: None) -> None:
    stream = configured(LOG_FORMAT="json", LOG_LEVEL="debug")
    log.warning("Listening for gRPC on '%s'", "0.0.0.0:8081")
    log.debug("a detail")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["level"] for e in entries] == ["warning", "debug", "error"]
    assert entries[0]["@message"] == "Listening for gRPC on '0.0.0.0:8081'"
    assert entries[0]["@timestamp"].endswith("Z") and "T" in entries[0]["@timestamp"]
    assert entries[0]["logger"] == "ratelimit_svc.test"
    assert "ValueError: boom" in entries[2]["exception"]


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("WARN", ["warning", "error"]),
        ("warn", ["warning", "error"]),
        ("INFO", ["info", "warning", "error"]),
        ("TRACE", ["debug", "info", "warning", "error"]),
        ("ERROR", ["error"]),
        ("FATAL", []),
    ],
)
def test_log_level(restore_root: None, level: str, shown: list[str]) -> None:
    stream = configured(LOG_FORMAT="json", LOG_LEVEL=level)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [json.loads(line)["level"] for line in stream.getvalue().splitlines()] == shown


def test_text_format_is_one_line_per_record(restore_root: None) -> None:
    stream = configured(LOG_LEVEL="INFO")
    log.info("Successfully loaded new configuration")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("INFO ratelimit_svc.test: Successfully loaded new configuration")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_credentials_are_redacted(restore_root: None, log_format: str) -> None:
    stream = configured(
        LOG_FORMAT=log_format,
        REDIS_AUTH="alice:s3cret-pw",
        REDIS_PERSECOND_AUTH="other-pw",
    )
    log.warning("connecting with %s", "alice:s3cret-pw")
    log.warning("auth failed for password s3cret-pw")
    log.warning("per second redis rejected other-pw")
    log.warning("upstream redis://bob:hunter2@cache:6379/0 is down")
    log.warning("settings: REDIS_AUTH=topsecret password=letmein token: abc123")
    try:
        raise ConnectionError("AUTH s3cret-pw rejected by redis://carol:pw9@db:6379")
    except ConnectionError:
        log.exception("backend error")
    out = stream.getvalue()
    for secret in ("s3cret-pw", "other-pw", "hunter2", "topsecret", "letmein", "abc123", "pw9"):
        assert secret not in out, out
    assert "redis://bob:<redacted>@cache:6379/0" in out
    assert "<redacted>" in out


def test_redact_filter_leaves_ordinary_messages_alone() -> None:
    redact = RedactFilter(["pw"]).redact
    text = "config error, unknown key 'token' at descriptors[0] (line 4)"
    assert redact(text) == text


# -- nothing per request above DEBUG -------------------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_requests_log_nothing_above_debug(tmp_path: Path, restore_root: None) -> None:
    env = base_env(**write_rules(tmp_path, GRPC_RULES))
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None
        records = Records()
        root = logging.getLogger()
        root.addHandler(records)
        root.setLevel(logging.DEBUG)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                ok = rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "v"))])
                for _ in range(5):  # within, then over the limit of 2
                    await stub.ShouldRateLimit(ok)
                await stub.ShouldRateLimit(
                    rls_pb2.RateLimitRequest(domain="nope", descriptors=[descriptor(("a", "b"))])
                )
                for bad in (
                    rls_pb2.RateLimitRequest(domain="", descriptors=[descriptor(("a", "b"))]),
                    rls_pb2.RateLimitRequest(domain="basic"),
                ):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.ShouldRateLimit(bad)
        finally:
            root.removeHandler(records)
    loud = [r for r in records.records if r.levelno > logging.DEBUG and r.name.startswith("ratelimit_svc")]
    assert loud == [], [r.getMessage() for r in loud]


def test_process_logs_json_to_stderr(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(**write_rules(tmp_path, GRPC_RULES), GRPC_PORT=str(port), LOG_FORMAT="json", LOG_LEVEL="INFO")
    proc, lines = start_process([sys.executable, "-m", "ratelimit_svc"], env)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        lines += proc.stderr.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    entries = [json.loads(line) for line in lines if line.strip()]
    messages = [e["@message"] for e in entries]
    assert f"Listening for gRPC on '127.0.0.1:{port}'" in messages
    assert "Successfully loaded new configuration" in messages
    assert all({"@timestamp", "@message", "level"} <= e.keys() for e in entries)
