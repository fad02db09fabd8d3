"""Bad input on every surface (docs/reliability.md (Bad input)): each gets a clear error and the service keeps serving.

Malformed and invalid-UTF-8 gRPC bytes, requests beyond the documented MAX_* limits (and beyond the
gRPC message size), garbage /json bodies, config files with every kind of defect, and garbage in
environment variables. The random versions of these are in test_properties.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from support.service_env import base_env as service_env

from ratelimit_svc.app import App
from ratelimit_svc.config.files import RuntimeLocation, load_from_files
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.errors import ConfigError, SettingsError
from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

ROOT = Path(__file__).resolve().parents[2]
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
RULES = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1000000}\n"


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    config_dir = tmp_path / "runtime" / "rl" / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "d.yaml").write_text(RULES)
    return service_env(
        RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="rl",
        RUNTIME_WATCH_ROOT="false", EXPIRATION_JITTER_MAX_SECONDS="300", **extra,
    )  # fmt: skip


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with App(Settings.from_env(base_env(tmp_path))) as running:
        yield running


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    assert app.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as chan:
        yield chan


def descriptor(*entries: tuple[str, str]) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor()
    for key, value in entries:
        d.entries.add(key=key, value=value)
    return d


GOOD = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v"))])


async def assert_still_serving(channel: grpc.aio.Channel) -> None:
    response = await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(GOOD, timeout=10)
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    assert response.statuses[0].current_limit.requests_per_unit == 1000000


async def refused(channel: grpc.aio.Channel, request: rls_pb2.RateLimitRequest | bytes) -> grpc.aio.AioRpcError:
    data = request if isinstance(request, bytes) else request.SerializeToString()
    raw = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(data, timeout=10)
    return caught.value


# -- malformed gRPC bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff\xff", "Wire format was corrupt"),
        (b"\x0a\x10short", "Wire format was corrupt"),  # length beyond the message
        (b"\x12\x05\x0a\x03\x0a\x01", "Wire format was corrupt"),  # truncated entry
        (b"\x0a\x02\xc3\x28", "String field had bad UTF-8"),  # domain
        (b"\x0a\x01d\x12\x07\x0a\x05\x0a\x01\xff\x12\x00", "String field had bad UTF-8"),  # key
        (b"\x0a\x01d\x12\x07\x0a\x05\x0a\x01k\x12\x01\xed", "String field had bad UTF-8"),  # value
        (b"\x0a\x04\xed\xa0\x80d", "String field had bad UTF-8"),  # an encoded surrogate
    ],
    ids=["garbage", "overlong-length", "truncated", "utf8-domain", "utf8-key", "utf8-value", "surrogate"],
)
async def test_malformed_bytes_are_invalid_argument_and_the_next_call_works(
    channel: grpc.aio.Channel, app: App, data: bytes, reason: str
) -> None:
    error = await refused(channel, data)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("malformed RateLimitRequest: ") and reason in details, details
    assert app.stats.get("ratelimit.service.call.should_rate_limit.service_error") == 1
    await assert_still_serving(channel)


# -- huge requests and the MAX_* limits ----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v"))] * 3000),
            "too many descriptors: 3000 (MAX_DESCRIPTORS_PER_REQUEST=256)",
        ),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(*[("k", "v")] * 1000)]),
            "descriptor 0 has too many entries: 1000 (MAX_ENTRIES_PER_DESCRIPTOR=64)",
        ),
        (
            rls_pb2.RateLimitRequest(
                domain="d", descriptors=[descriptor(("k", "v")), descriptor(("k", "v" * 2**20))]
            ),
            "descriptor 1 entry 0 value is 1048576 bytes long (MAX_VALUE_BYTES=65536)",
        ),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("é" * 40000, "v"))]),
            "descriptor 0 entry 0 key is 80000 bytes long (MAX_VALUE_BYTES=65536)",
        ),
        (
            rls_pb2.RateLimitRequest(domain="d" * 70000, descriptors=[descriptor(("k", "v"))]),
            "domain is 70000 bytes long (MAX_VALUE_BYTES=65536)",
        ),
    ],
    ids=["descriptors", "entries", "megabyte-value", "multibyte-key", "domain"],
)
async def test_huge_requests_are_invalid_argument(
    channel: grpc.aio.Channel, request_: rls_pb2.RateLimitRequest, message: str
) -> None:
    error = await refused(channel, request_)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    await assert_still_serving(channel)


async def test_huge_per_descriptor_hits_addend_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    d = descriptor(("k", "v"))
    d.hits_addend.value = 2**64 - 1
    error = await refused(channel, rls_pb2.RateLimitRequest(domain="d", descriptors=[d]))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"descriptor 0 hits_addend {2**64 - 1} is above 4294967295"
    await assert_still_serving(channel)


async def test_message_beyond_max_request_bytes_is_refused_by_grpc(
    channel: grpc.aio.Channel,
) -> None:
    values = [descriptor(("k", "v" * 60000)) for _ in range(80)]  # each value within its limit
    error = await refused(channel, rls_pb2.RateLimitRequest(domain="d", descriptors=values))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (error.details() or "")
    await assert_still_serving(channel)


async def test_requests_at_the_limits_are_served(channel: grpc.aio.Channel) -> None:
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)
    many = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v"))] * 256)
    response = await stub.ShouldRateLimit(many, timeout=10)
    assert len(response.statuses) == 256
    long = rls_pb2.RateLimitRequest(
        domain="d", descriptors=[descriptor(*[("k", "w" * 1000)] * 63, ("k", "v" * 65536))]
    )
    assert (await stub.ShouldRateLimit(long, timeout=10)).overall_code == rls_pb2.RateLimitResponse.OK


async def test_limits_are_settings_and_zero_means_none(tmp_path: Path) -> None:
    env = base_env(
        tmp_path, MAX_DESCRIPTORS_PER_REQUEST="2", MAX_ENTRIES_PER_DESCRIPTOR="0",
        MAX_VALUE_BYTES="0", MAX_REQUEST_BYTES="8MiB".replace("MiB", "388608"),
    )  # fmt: skip
    async with App(Settings.from_env(env)) as app:
        assert app.grpc is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc.port}") as channel:
            three = rls_pb2.RateLimitRequest(domain="d", descriptors=[descriptor(("k", "v"))] * 3)
            error = await refused(channel, three)
            assert error.details() == "too many descriptors: 3 (MAX_DESCRIPTORS_PER_REQUEST=2)"
            unbounded = rls_pb2.RateLimitRequest(
                domain="d", descriptors=[descriptor(*[("k", "v")] * 500, ("k", "v" * 5_000_000))]
            )
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            response = await stub.ShouldRateLimit(unbounded, timeout=10)
            assert response.overall_code == rls_pb2.RateLimitResponse.OK


# -- garbage on /json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"not json",
        b"[" * 100_000,
        b'{"domain": "\\ud800", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}',
        b'{"domain": "d", "descriptors": [{"entries": [{"key": 1, "value": "v"}]}]}',
        b'{"domain": "d", "descriptors": [{"entries": [{"key": "k"}]}], "unknown": 1}',
        b'{"domain": "d", "descriptors": [{"entries": [{"key": "k"}], "hitsAddend": -1}]}',
        b'{"domain": "d", "descriptors": {"entries": []}}',
        json.dumps({"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}] * 300}).encode(),
        json.dumps({"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v" * 70000}]}]}).encode(),
        b'{"domain": "d", "descriptors": [{"entries": [{"key": "k"}], "hitsAddend": "18446744073709551615"}]}',
    ],
    ids=[
        "empty", "binary", "not-json", "deep-nesting", "lone-surrogate", "wrong-type",
        "unknown-field", "negative", "not-a-list", "too-many-descriptors", "value-too-long",
        "huge-hits",
    ],
)
async def test_garbage_json_is_400_and_the_service_keeps_serving(
    app: App, channel: grpc.aio.Channel, body: bytes
) -> None:
    assert app.http is not None
    url = f"http://127.0.0.1:{app.http.port}/json"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body) as answer:
            assert answer.status == 400
            assert (await answer.json())["error"] == "Bad Request"
        good = {"domain": "d", "descriptors": [{"entries": [{"key": "k", "value": "v"}]}]}
        async with session.post(url, json=good) as answer:
            assert answer.status == 200
    await assert_still_serving(channel)


@pytest.mark.parametrize(
    "data",
    [b"*4\r\n$6\r\nCLIENT\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET /json HTTP/9.9\r\n\r\n"],
    ids=["redis-protocol", "tls-hello", "bad-version"],
)
async def test_non_http_bytes_on_the_http_port_get_400_and_it_keeps_serving(
    app: App, data: bytes
) -> None:
    assert app.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", app.http.port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{app.http.port}/healthcheck") as health:
            assert health.status == 200


async def test_oversized_json_body_is_refused(app: App) -> None:
    assert app.http is not None
    url = f"http://127.0.0.1:{app.http.port}/json"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=io.BytesIO(b" " * (8 * 2**20))) as answer:
            assert answer.status == 413


# -- config files with every kind of defect ------------------------------------------------------

ESCAPE = (
    "found invalid Unicode character escape code"
    if yaml.__with_libyaml__
    else "error loading config file: invalid escape in a string"
)
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # libyaml refuses such nesting itself; PyYAML's own parser goes on to our depth check
        ("[" * 5000 + "]" * 5000, "exceeded maximum nesting depth" if yaml.__with_libyaml__ else "error loading config file: nested more than 100 deep"),
        (
            "domain: d\ndescriptors:\n"
            + "".join("  " * i + "- key: k\n" + "  " * i + "  descriptors:\n" for i in range(1, 120)),
            "error loading config file: nested more than 100 deep",
        ),
        (
            "domain: d\ndescriptors: &a\n  - key: k\n    descriptors: *a\n",
            "error loading config file: nested more than 100 deep (or a recursive alias) (line ",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    metadata: &m {a: *m}\n",
            "error loading config file: nested more than 100 deep (or a recursive alias) (line ",
        ),
        (LAUGHS, "error loading config file: document contains excessive aliasing"),
        (
            "domain: d\ndescriptors:\n  - key: k\n    metadata: {b: !!binary gA==}\n",
            "error loading config file: cannot construct a value: !!binary value contains invalid base64 data",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    metadata: {n: {x: .nan}}\n",
            "error loading config file: descriptors[0].metadata.n.x: a number value (nan)",
        ),
        ("domain: d\x00\n", "error loading config file: unacceptable character #x0000"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: !!python/object:os.system x}\n", "error checking config"),
        ("domain: d\n!!int 3: x\n", "config error, key is not of type string: 3"),
        ("- a\n- b\n", "error loading config file: line 1: cannot unmarshal !!seq into map"),
        # go-yaml reads an integer beyond uint64 as a float, which the key check refuses
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 99999999999999999999}\n", "error checking config"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: !!int 0x}\n", "error loading config file: cannot decode !!str `0x` as a !!int"),
        ("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: !!bool maybe\n", "cannot unmarshal !!bool `maybe` into bool"),
        ("domain: d\ndescriptors:\n  - key: k\n    metadata: {a: !!float x}\n", "cannot construct a value: cannot decode `x` as float"),
        ('domain: "\\U00110000"\n', ESCAPE),
        ('domain: "\\UFFFFFFFF"\n', ESCAPE),
    ],
    ids=[
        "deep-flow", "deep-block", "recursive-alias", "recursive-metadata", "billion-laughs",
        "binary-metadata", "nan-metadata", "nul", "python-tag", "int-key",
        "list-document", "huge-integer", "int-tag", "bool-tag", "float-tag",
        "escape-beyond-unicode", "escape-overflow",
    ],
)
def test_defective_config_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([ConfigFile("bad.yaml", text)])
    assert str(caught.value).startswith("bad.yaml: ")
    assert message in str(caught.value), str(caught.value)


def test_metadata_dates_and_nested_keys_become_text() -> None:
    text = "domain: d\ndescriptors:\n  - key: k\n    metadata: {when: 2001-01-01, bad: 2001-02-30, b: !!binary aGk=, m: {1: a, n: b}}\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
    (rule,) = load_config([ConfigFile("m.yaml", text)]).rules()
    # as go-yaml hands them to the reference: timestamps and date-like text stay text
    assert rule.metadata == {"when": "2001-01-01", "bad": "2001-02-30", "b": "hi", "m": {"1": "a", "n": "b"}}


def test_defective_files_in_the_config_directory(tmp_path: Path) -> None:
    directory = tmp_path / "rt" / "config"
    directory.mkdir(parents=True)
    location = RuntimeLocation(str(tmp_path), "rt", "config")
    (directory / "loop").symlink_to(directory / "loop")  # a symlink loop: not a regular file
    (directory / "dangling.yaml").symlink_to(tmp_path / "nowhere")
    (directory / "dir.yaml").mkdir()
    (directory / "ok.yaml").write_text(RULES)
    config = load_from_files(location)
    assert config is not None and list(config.domains) == ["d"]
    (directory / "latin1.yaml").write_bytes(b"domain: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^latin1.yaml: error loading config file: .*utf-8"):
        load_from_files(location)


# -- garbage in environment variables ------------------------------------------------------------

BAD_ENVIRONMENT: list[tuple[str, str]] = [
    ("BREAKER_FAILURE_THRESHOLD", "-1"),
    ("BREAKER_COOLDOWN", "soon"),
    ("BACKEND_MAX_IN_FLIGHT", "1e3"),
    ("MAX_DESCRIPTORS_PER_REQUEST", "many"),
    ("MAX_ENTRIES_PER_DESCRIPTOR", "-3"),
    ("MAX_VALUE_BYTES", "64k"),
    ("MAX_REQUEST_BYTES", "10"),
    ("REDIS_OP_TIMEOUT", "0s"),
    ("GRPC_PORT", "70000"),
    ("NEAR_LIMIT_RATIO", "0.8.5"),
    ("LOG_LEVEL", "\x1b[31mloud\nlines"),
    ("PORT", "\udcff\udcfe80"),  # undecodable bytes, as os.environ presents them
    ("EXPIRATION_JITTER_MAX_SECONDS", "9" * 5000),
]


@pytest.mark.parametrize(("variable", "value"), BAD_ENVIRONMENT, ids=[v for v, _ in BAD_ENVIRONMENT])
def test_garbage_environment_is_one_settings_error_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"invalid value for {variable}: ") and "\n" not in message


# The process: a few of the worst, started in parallel (each start imports grpc).
PROCESS_CASES: list[tuple[str, bytes]] = [
    ("BREAKER_COOLDOWN", b"soon"),
    ("LOG_LEVEL", b"\x1b[31mloud\nlines"),
    ("PORT", b"\xff\xfe80"),
    ("MAX_REQUEST_BYTES", b"9" * 5000),
]


def test_garbage_environment_stops_startup_with_one_line_naming_the_variable() -> None:
    processes = []
    for variable, value in PROCESS_CASES:
        env: dict[str | bytes, str | bytes] = {**os.environ, "BACKEND_TYPE": "memory", "USE_STATSD": "false"}
        env[variable] = value
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "ratelimit_svc"], env=env, cwd=ROOT,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        )
    for (variable, _), process in zip(PROCESS_CASES, processes, strict=True):
        out, err = process.communicate(timeout=60)
        lines = err.decode("utf-8", "backslashreplace").strip().splitlines()
        assert process.returncode == 1, (variable, err)
        assert len(lines) == 1, (variable, err)
        assert lines[0].startswith(f"ratelimit: invalid value for {variable}: "), lines[0]
        assert out == b""
