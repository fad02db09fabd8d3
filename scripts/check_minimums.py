"""Install the declared minimum versions of the runtime dependencies into a fresh venv and check
that the service really works with them (`make check-minimums`, docs/deployment.md (Installs)).

Every ``name>=X`` of ``[project.dependencies]`` (and of the ``uvloop`` and ``memcache`` extras)
becomes the constraint ``name==X``; the package is installed with those constraints, every module
is imported, ``ratelimit --version`` runs, and a few test modules that drive the real backends run
against that environment. A minimum that is too low fails here instead of on a user's machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("uvloop", "memcache")
# Test tools for the checks below, at whatever version pip picks (they are not what is checked).
TEST_TOOLS = ("pytest", "pytest-asyncio", "pytest-timeout", "trustme", "hypothesis", "redis")
# Test modules run against the minimums: the gRPC and HTTP servers, Redis (single and sentinel)
# and the sinks.
TEST_MODULES = (
    "tests/integration/test_grpc.py",
    "tests/integration/test_http.py",
    "tests/integration/test_redis_store.py",
    "tests/integration/test_sentinel.py",
    "tests/integration/test_sinks.py",
)


def minimum_constraints(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==minimum`` for every runtime requirement with a lower bound."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    constraints = []
    for line in requirements:
        requirement = Requirement(line)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if not lower:
            raise SystemExit(f"{line!r} declares no minimum (>=): add one")
        constraints.append(f"{requirement.name}=={lower[0]}")
    return constraints


def run(*args: str | Path, cwd: Path = ROOT) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "minimums")
    parser.add_argument("--no-tests", action="store_true", help="install and import only")
    args = parser.parse_args(argv)

    shutil.rmtree(args.venv, ignore_errors=True)
    venv.create(args.venv, with_pip=True)
    python = args.venv / "bin" / "python"
    constraints = args.venv / "minimums.txt"
    constraints.write_text("\n".join(minimum_constraints()) + "\n")
    print(constraints.read_text(), end="")
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    # From a clean copy: a build/ directory left in the work tree would be packaged as well.
    source = args.venv / "source"
    shutil.copytree(
        ROOT / "src", source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "compiled.sha256"),
    )  # fmt: skip
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    # The minimums are the dependencies': the package as Python (the compiled modules are the
    # same code, docs/performance.md (Compiled modules)), which also saves a minute's compile.
    os.environ["RATELIMIT_SVC_PURE"] = "1"
    run(*pip, "--constraint", constraints, f"{source}[{','.join(EXTRAS)}]")
    run(
        python, "-c",
        "import pkgutil, importlib, ratelimit_svc\n"
        "for m in pkgutil.walk_packages(ratelimit_svc.__path__, 'ratelimit_svc.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "import opentelemetry.exporter.otlp.proto.grpc.trace_exporter, uvloop, dns.resolver\n",
        cwd=args.venv,  # the installed package, not src/
    )  # fmt: skip
    run(args.venv / "bin" / "ratelimit", "--version", cwd=args.venv)
    if not args.no_tests:
        run(*pip, "--constraint", constraints, *TEST_TOOLS)
        run(
            python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
            "-o", "addopts=", *TEST_MODULES,
        )  # fmt: skip
    print("the declared minimums install and work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
