"""docker-compose.yaml, checked without a Docker engine: its structure, that everything it builds
from or mounts exists (and is not dropped by .dockerignore), that the pieces agree with each other
(hosts and ports in Envoy's config, the service's settings, Prometheus's targets), and that the
Envoy config it mounts is valid for the real Envoy binary (``envoy --mode validate``).
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ratelimit_svc.settings.model import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import envoy_config  # noqa: E402
from stack import find_envoy  # noqa: E402

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's ``./host:/container[:mode]`` volumes."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("./"), f"{service}: {volume} is not a bind mount of a repo path"
        mounts[target] = ROOT / source
    return mounts


def host_path(service: str, container_path: str) -> Path:
    """Where a file the container reads comes from, through the service's bind mounts."""
    for target, source in sorted(bind_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{service}: nothing mounted at {container_path}")


def published(service: str) -> dict[int, str]:
    """Container port -> the ``host[:ip]`` it is published on."""
    ports = {}
    for mapping in SERVICES[service].get("ports", []):
        *host, container = str(mapping).split(":")
        ports[int(container)] = ":".join(host)
    return ports


def envoy_config_path() -> Path:
    command = SERVICES["envoy"]["command"]
    return host_path("envoy", command[command.index("-c") + 1])


def envoy_cluster_address(config: dict[str, Any], name: str) -> tuple[str, int]:
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    socket = address["address"]["socket_address"]
    return socket["address"], int(socket["port_value"])


# -- structure and files ---------------------------------------------------------------------


def test_services_and_profiles() -> None:
    assert set(SERVICES) == {"redis", "ratelimit", "envoy", "upstream", "prometheus"}
    assert SERVICES["prometheus"]["profiles"] == ["metrics"]
    assert all("profiles" not in SERVICES[name] for name in set(SERVICES) - {"prometheus"})
    assert SERVICES["envoy"]["image"].startswith("envoyproxy/envoy:v")
    assert SERVICES["ratelimit"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["envoy"]["depends_on"]["ratelimit"]["condition"] == "service_healthy"
    # Envoy's admin interface must not be reachable from other machines.
    assert published("envoy")[9901].startswith("127.0.0.1:")


def test_every_mounted_file_exists() -> None:
    checked = 0
    for name in SERVICES:
        for target, source in bind_mounts(name).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            checked += 1
    assert checked >= 4
    assert (host_path("ratelimit", "/data/ratelimit/config") / "example.yaml").is_file()
    assert host_path("upstream", "/app/upstream.py").is_file()
    assert envoy_config_path().is_file()


# -- the ratelimit image -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.compile(fnmatch.translate(glob).replace(".*/", "(?:.*/)?", 1))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negated
    return ignored


def test_ratelimit_is_built_from_a_pinned_slim_python_image_as_a_non_root_user() -> None:
    build = SERVICES["ratelimit"]["build"]
    context = ROOT / build["context"]
    assert (context / build["dockerfile"]).is_file()
    instructions = dockerfile_instructions()
    stages = [arg.split()[0] for op, arg in instructions if op == "FROM"]
    assert len(stages) == 2, "a build stage and a runtime stage"
    for stage in stages:  # slim, pinned by digest (docs/deployment.md (Image))
        assert re.fullmatch(r"python:3\.1[1-9][.\d]*-slim-\w+@sha256:[0-9a-f]{64}", stage), stage
    assert stages[0] == stages[1], "both stages on the same base: the venv is copied across"
    final_stage = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [arg for op, arg in instructions[final_stage:] if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    # The final stage gets the built venv and the license, nothing from the build context else.
    final_copies = [arg for op, arg in instructions[final_stage:] if op == "COPY"]
    assert final_copies[0].startswith("--from=build /opt/ratelimit ")
    # The environment is built by scripts/build_venv.sh from requirements.lock (the test that
    # builds the same environment without Docker: tests/integration/test_installs.py).
    runs = [arg for op, arg in instructions[:final_stage] if op == "RUN"]
    compiler = [run for run in runs if "apt-get install" in run]  # mypyc's C compiler
    assert len(compiler) == 1 and "gcc" in compiler[0].split(), runs
    assert [run for run in runs if run not in compiler] == [
        "sh build_venv.sh deps /opt/ratelimit", "sh build_venv.sh app /opt/ratelimit",
    ]  # fmt: skip
    # What the build copies from the context exists and is not dropped by .dockerignore.
    copied = [
        source
        for op, arg in instructions
        if op == "COPY" and not arg.startswith("--from")
        for source in arg.split()[:-1]
    ]
    assert set(copied) == {
        "scripts/build_venv.sh", "requirements.lock", "pyproject.toml", "setup.py", "README.md",
        "LICENSE", "src",
    }  # fmt: skip
    for source in copied:
        assert (context / source).exists(), source
        assert not dockerignored(source), f".dockerignore drops {source}"
    assert not dockerignored("src/ratelimit_svc/app.py")
    assert dockerignored(".venv/bin/python") and dockerignored("tests/integration/test_compose.py")
    assert dockerignored("src/ratelimit_svc/__pycache__/app.cpython-312.pyc")
    assert dockerignored("src/ratelimit_svc/service.cpython-311-x86_64-linux-gnu.so")
    assert dockerignored("src/ratelimit_svc/compiled.sha256")
    assert dockerignored("scripts/demo.py") and dockerignored(".cache/bin/helm")


def test_only_envoys_listener_is_published_beyond_loopback() -> None:
    """Debug, admin, metrics and the service's own ports are for this machine only."""
    for name in SERVICES:
        for container_port, host in published(name).items():
            if (name, container_port) == ("envoy", 10000):
                continue
            assert host.startswith("127.0.0.1:"), f"{name}:{container_port} is published on {host}"


def test_ratelimit_environment_is_valid_for_the_service() -> None:
    environment = {k: str(v) for k, v in SERVICES["ratelimit"]["environment"].items()}
    settings = Settings.from_env(environment)
    assert settings.backend_type == "redis"
    assert settings.redis.url == "redis:6379" and "redis" in SERVICES
    assert (settings.stats.use_prometheus, settings.stats.use_statsd) == (True, False)
    # The config directory the service reads is the one mounted from config/.
    config_dir = "/".join(
        (settings.runtime_root, settings.runtime_subdirectory, settings.runtime_appdirectory)
    )
    assert host_path("ratelimit", config_dir) == ROOT / "config"
    assert set(published("ratelimit")) == {settings.port, settings.grpc_port, settings.debug_port}


def test_prometheus_scrapes_the_service() -> None:
    prometheus = yaml.safe_load(
        host_path("prometheus", "/etc/prometheus/prometheus.yml").read_text()
    )
    settings = Settings.from_env(
        {k: str(v) for k, v in SERVICES["ratelimit"]["environment"].items()}
    )
    (rules,) = prometheus["rule_files"]
    assert host_path("prometheus", rules) == ROOT / "deploy" / "observability" / "alerts.yaml"
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "ratelimit"]
    port = settings.stats.prometheus_addr.rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"ratelimit:{port}"]
    assert job["metrics_path"] == settings.stats.prometheus_path


# -- Envoy's config ------------------------------------------------------------------------------


def test_mounted_envoy_config_is_the_rendered_template() -> None:
    assert envoy_config_path() == envoy_config.COMPOSE_CONFIG
    assert envoy_config.COMPOSE_CONFIG.read_text() == envoy_config.render_compose(), (
        "envoy/envoy-compose.yaml is stale: run python scripts/envoy_config.py --write-compose"
    )
    for params in (envoy_config.EnvoyParams(), envoy_config.COMPOSE):
        assert not re.search(r"\$\{[A-Z_]+\}", envoy_config.render(params))


def test_envoy_config_points_at_the_compose_services() -> None:
    config = yaml.safe_load(envoy_config_path().read_text())
    ratelimit = Settings.from_env(
        {k: str(v) for k, v in SERVICES["ratelimit"]["environment"].items()}
    )
    assert envoy_cluster_address(config, "ratelimit") == ("ratelimit", ratelimit.grpc_port)
    upstream_command = SERVICES["upstream"]["command"]
    upstream_port = int(upstream_command[upstream_command.index("--port") + 1])
    assert envoy_cluster_address(config, "upstream") == ("upstream", upstream_port)
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] in published("envoy")
    assert config["admin"]["address"]["socket_address"]["port_value"] in published("envoy")


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            find_envoy(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "-l",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mounted_envoy_config_is_valid_for_envoy() -> None:
    result = validate(envoy_config_path())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_envoy_validation_rejects_a_broken_config(tmp_path: Path) -> None:
    broken = envoy_config.render_compose().replace("failure_mode_deny:", "failure_mode_denied:")
    (tmp_path / "broken.yaml").write_text(broken)
    result = validate(tmp_path / "broken.yaml")
    assert result.returncode != 0
    assert "failure_mode_denied" in result.stdout + result.stderr


@pytest.mark.parametrize("lua_error", ["function envoy_on_request(", "this is not lua"])
def test_envoy_validation_compiles_the_identity_lua(tmp_path: Path, lua_error: str) -> None:
    (tmp_path / "identity.lua").write_text(lua_error)
    template = envoy_config.TEMPLATE.read_text()
    params = envoy_config.EnvoyParams()
    original = envoy_config.IDENTITY_LUA
    try:
        envoy_config.IDENTITY_LUA = tmp_path / "identity.lua"
        rendered = envoy_config.render(params, template)
    finally:
        envoy_config.IDENTITY_LUA = original
    (tmp_path / "envoy.yaml").write_text(rendered)
    assert validate(tmp_path / "envoy.yaml").returncode != 0
