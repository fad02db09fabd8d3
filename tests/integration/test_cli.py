"""``ratelimit-config-check`` and ``ratelimit-client``, run as the installed commands
(docs/operations.md (Command-line tools))."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from support.clock import FakeClock
from support.service_env import base_env, write_rules
from test_grpc import RULES as GRPC_RULES

from ratelimit_svc.app import App
from ratelimit_svc.main import config_check_main
from ratelimit_svc.settings.model import Settings

BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def config_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ratelimit-config-check"), *args], capture_output=True, text=True, timeout=60
    )


def copy_fixtures(tmp_path: Path, directory: str, *names: str) -> Path:
    target = tmp_path / "configs"
    target.mkdir()
    for name in names:
        shutil.copy(FIXTURES / directory / name, target / name)
    return target


# -- ratelimit-config-check ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--config_dir", "-config_dir", "-config_dir="])
def test_config_check_ok(tmp_path: Path, flag: str) -> None:
    directory = copy_fixtures(tmp_path, "config_ok", "basic_config.yaml", "messaging.yaml", "wildcard.yaml")
    args = [flag + str(directory)] if flag.endswith("=") else [flag, str(directory)]
    result = config_check(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "checking rate limit configs...",
        f"loading config directory: {directory}",
        f"opening config file: {directory}/basic_config.yaml",
        f"opening config file: {directory}/messaging.yaml",
        f"opening config file: {directory}/wildcard.yaml",
        "all rate limit configs ok",
    ]


def test_config_check_error_names_the_file_and_exits_1(tmp_path: Path) -> None:
    directory = copy_fixtures(tmp_path, "config_errors", "invalid_unit.yaml")
    result = config_check("--config_dir", str(directory))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "checking rate limit configs...",
        f"loading config directory: {directory}",
        f"opening config file: {directory}/invalid_unit.yaml",
    ]
    assert lines[3].startswith(
        f"error loading rate limit configs: {directory}/invalid_unit.yaml: invalid rate limit unit 'foo'"
    )
    assert len(lines) == 4


def test_duplicate_domains_fail_unless_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = copy_fixtures(tmp_path, "config_errors", "duplicate_domain_1.yaml", "duplicate_domain_2.yaml")
    with pytest.raises(SystemExit) as exited:
        config_check_main(["-config_dir", str(directory)])
    assert exited.value.code == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"error loading rate limit configs: {directory}/duplicate_domain_2.yaml: duplicate domain ")
    config_check_main(["-config_dir", str(directory), "-merge_domain_configs"])
    assert capsys.readouterr().out.splitlines()[-1] == "all rate limit configs ok"
    config_check_main(["--config_dir", str(directory), "--merge_domain_configs"])
    assert capsys.readouterr().out.splitlines()[-1] == "all rate limit configs ok"


def test_config_check_missing_directory(tmp_path: Path) -> None:
    result = config_check("--config_dir", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == f"error opening directory {tmp_path / 'nope'}: No such file or directory"


def test_config_check_requires_the_directory_flag() -> None:
    result = config_check()
    assert result.returncode == 2
    assert "config_dir" in result.stderr


# -- ratelimit-client ------------------------------------------------------------------------------


async def client(*args: str) -> tuple[int, str]:
    """Run the installed ratelimit-client without blocking the service's event loop."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "ratelimit-client"), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    # A fake clock: the three client processes of one test may take seconds, and a real minute
    # boundary between them would reset the per-minute counter.
    clock = FakeClock()
    async with App(Settings.from_env(base_env(**write_rules(tmp_path, GRPC_RULES))), clock=clock) as running:
        yield running


def dial(app: App) -> str:
    assert app.grpc is not None
    return f"127.0.0.1:{app.grpc.port}"


async def test_client_prints_the_answer(app: App) -> None:
    code, out = await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=a")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "domain: basic"
    assert lines[2] == "response: overall_code: OK"
    assert "  current_limit {" in lines
    assert "    requests_per_unit: 2" in lines
    assert "    unit: MINUTE" in lines
    assert "  limit_remaining: 1" in lines


async def test_client_several_descriptors_and_over_limit(app: App) -> None:
    for _ in range(2):
        await client("-dial_string", dial(app), "-domain", "basic", "-descriptors", "key1=b")
    code, out = await client(
        "-dial_string", dial(app), "-domain", "basic", "-descriptors", "key1=b", "-descriptors", "other=x,more=y"
    )
    assert code == 0, out
    assert "response: overall_code: OVER_LIMIT" in out
    assert out.count("statuses {") == 2


async def test_client_exits_1_on_a_request_error(app: App) -> None:
    code, out = await client("--dial_string", dial(app), "--domain", "", "--descriptors", "key1=a")
    assert code == 1
    assert out.splitlines()[-1] == "request error: INVALID_ARGUMENT: rate limit domain must not be empty"


async def test_client_exits_1_when_nothing_listens(tmp_path: Path) -> None:
    code, out = await client("--dial_string", "127.0.0.1:1", "--domain", "d", "--descriptors", "k=v", "--timeout", "2")
    assert code == 1
    assert out.splitlines()[-1].startswith("request error: UNAVAILABLE")


async def test_client_with_tls_and_mtls_flags(tmp_path: Path) -> None:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    user = client_ca.issue_cert("client.example")
    files = {
        "ca.pem": server_ca.cert_pem.bytes(),
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "client-ca.pem": client_ca.cert_pem.bytes(),
        "client.pem": user.cert_chain_pems[0].bytes(),
        "client.key": user.private_key_pem.bytes(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        GRPC_SERVER_USE_TLS="true",
        GRPC_SERVER_TLS_CERT=str(tmp_path / "server.pem"),
        GRPC_SERVER_TLS_KEY=str(tmp_path / "server.key"),
        GRPC_CLIENT_TLS_CACERT=str(tmp_path / "client-ca.pem"),
        GRPC_CLIENT_TLS_SAN="client.example",
    )
    async with App(Settings.from_env(env)) as app:
        target = ["--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=tls"]
        code, out = await client(
            *target, "--grpc_use_tls", "--grpc_server_ca_file", str(tmp_path / "ca.pem"),
            "--grpc_cert_file", str(tmp_path / "client.pem"), "--grpc_key_file", str(tmp_path / "client.key"),
        )
        assert code == 0, out
        assert "response: overall_code: OK" in out
        # the reference client's spelling of the same flags
        code, out = await client(
            *target, "-grpc-use-tls", "-grpc-server-ca-file", str(tmp_path / "ca.pem"),
            "-grpc-cert-file", str(tmp_path / "client.pem"), "-grpc-key-file", str(tmp_path / "client.key"),
        )
        assert code == 0, out
        # without the client certificate the handshake fails
        code, out = await client(*target, "--grpc_use_tls", "--grpc_server_ca_file", str(tmp_path / "ca.pem"))
        assert code == 1
        assert "request error: UNAVAILABLE" in out
        # a plaintext client is refused
        code, out = await client(*target)
        assert code == 1
        code, out = await client(*target, "--grpc_use_tls", "--grpc_server_ca_file", str(tmp_path / "missing.pem"))
        assert code == 1
        assert "missing.pem" in out


# -- first contact: bad arguments, --help, --version, --peek (docs/deployment.md (First contact)) --


@pytest.mark.parametrize(
    ("command", "args", "complaint"),
    [
        ("ratelimit", ["--bogus"], "unrecognized arguments: --bogus"),
        ("ratelimit", ["serve"], "unrecognized arguments: serve"),
        ("ratelimit-client", ["--hits_addend", "-3"], "-3 is out of range"),
        ("ratelimit-client", ["--hits_addend", "many"], "'many' is not a whole number"),
        ("ratelimit-client", ["--descriptors", "nope"], "invalid descriptor entry 'nope'"),
        ("ratelimit-client", ["--timeout", "0"], "must be a positive number of seconds"),
        ("ratelimit-client", ["--peek", "--hits_addend", "2"], "cannot be combined with --hits_addend"),
        ("ratelimit-config-check", [], "the following arguments are required"),
        ("ratelimit-config-check", ["--config_dir"], "expected one argument"),
    ],
)
def test_every_cli_rejects_bad_arguments_with_a_usage_line(command: str, args: list[str], complaint: str) -> None:
    result = subprocess.run([str(BIN / command), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: {command} ")
    assert complaint in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stdout + result.stderr


def test_ratelimit_help_and_version_print_and_exit() -> None:
    """Without a Redis or a config: --help and --version never start the service."""
    from ratelimit_svc import __version__

    env = {"PATH": str(BIN), "BACKEND_TYPE": "redis", "REDIS_URL": "/nonexistent.sock"}
    help_ = subprocess.run([str(BIN / "ratelimit"), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert help_.returncode == 0 and help_.stderr == ""
    assert help_.stdout.startswith("usage: ratelimit ")
    assert "environment variables" in help_.stdout and "docs/deployment.md" in help_.stdout
    version = subprocess.run([str(BIN / "ratelimit"), "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert (version.returncode, version.stdout) == (0, f"ratelimit-svc {__version__}\n")


async def test_client_peek_shows_the_counter_without_counting(app: App) -> None:
    assert (await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=p"))[0] == 0
    for _ in range(3):  # looking, however often, adds nothing
        code, out = await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=p", "--peek")
        assert code == 0, out
        assert out.splitlines()[-1] == "peek key1=p: 1/2 per minute used, 1 remaining, resets in 35s"
        assert "  limit_remaining: 1" in out
    # The one hit counted is the only one: a second real hit is still within the limit.
    code, out = await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=p")
    assert "response: overall_code: OK" in out and "limit_remaining" not in out  # 0: not printed
    code, out = await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "key1=p", "--peek")
    assert out.splitlines()[-1] == "peek key1=p: 2/2 per minute used (at or over the limit), 0 remaining, resets in 35s"
    code, out = await client("--dial_string", dial(app), "--domain", "basic", "--descriptors", "nothing=here", "--peek")
    assert out.splitlines()[-1] == "peek nothing=here: no limit applies"
