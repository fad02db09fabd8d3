"""Builds the request path's modules with mypyc when it can (docs/performance.md, Compiled modules).

The package is plain Python; these modules are also compiled to C extensions when mypyc and a C
compiler are there, which takes about a third of the instructions off each request. Without them
(or with RATELIMIT_SVC_PURE=1) the same modules run as Python, with the same behaviour.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig

from setuptools import setup

# The modules every ShouldRateLimit request runs through, from the gRPC-over-ASGI layer down to
# the counters (a compiled class cannot be subclassed or patched by Python code: keep the whole
# class hierarchy of a store on one side).
COMPILED = [
    "ratelimit_svc/rls_wire.py",
    "ratelimit_svc/service.py",
    "ratelimit_svc/servers/grpc_asgi.py",
    "ratelimit_svc/limiter/limiter.py",
    "ratelimit_svc/limiter/matching.py",
    "ratelimit_svc/limiter/tuples.py",
    "ratelimit_svc/backends/memory.py",
    "ratelimit_svc/backends/latency.py",
    "ratelimit_svc/stats/registry.py",
    "ratelimit_svc/workers/aggregation.py",  # a subclass of registry.MemoryStats
    "ratelimit_svc/backends/breaker.py",
    "ratelimit_svc/backends/persecond.py",
    "ratelimit_svc/backends/redis/protocol.py",
    "ratelimit_svc/backends/redis/client.py",
    "ratelimit_svc/backends/redis/connection.py",
    "ratelimit_svc/backends/redis/pipelining.py",
    "ratelimit_svc/backends/redis/scripts.py",
    "ratelimit_svc/backends/redis/single.py",
    "ratelimit_svc/backends/redis/cluster.py",
    "ratelimit_svc/backends/redis/sentinel.py",
]

# The setup.py commands that only describe the package.
METADATA_ONLY = {"egg_info", "dist_info", "sdist", "--version", "--name"}


def compiler_present() -> bool:
    """Whether a C compiler and Python's headers are there (a slim image or a bare machine may
    have neither: the package then installs as Python)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_paths()["include"]
    return shutil.which(cc) is not None and os.path.exists(os.path.join(include, "Python.h"))


def write_stamp(here: str, compiled: bool) -> None:
    """The sources' digests, read by ratelimit_svc/__init__.py: an extension whose source has
    changed since (an edited checkout) is not used. No stamp: no extension is used."""
    package = os.path.join(here, "src", "ratelimit_svc")
    stamp = os.path.join(package, "compiled.sha256")
    if not compiled:
        if os.path.exists(stamp):
            os.remove(stamp)
        return
    with open(stamp, "w") as out:
        for path in COMPILED:
            with open(os.path.join(here, "src", path), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out.write(f"{digest}  {os.path.relpath(path, 'ratelimit_svc')}\n")


def extensions() -> list[object]:
    if set(sys.argv[1:]) <= METADATA_ONLY:  # pip asks for metadata first: compile once, later
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    write_stamp(here, compiled=False)  # until the extensions are made
    if os.environ.get("RATELIMIT_SVC_PURE") == "1" or not compiler_present():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # mypy is a build requirement; a build without it stays Python
        return []
    build = os.path.join(here, "build", "mypyc")
    os.makedirs(build, exist_ok=True)
    # Not the project's strict mypy settings (`make lint` checks those): an isolated build has
    # none of the dependencies' types, and untyped values compile as Python objects.
    config = os.path.join(build, "mypy.ini")
    with open(config, "w") as f:
        f.write("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
    # The shared library of a former list of modules is named after that list: not imported by
    # anything once the list changes, so not left behind beside the new one.
    for name in os.listdir(os.path.join(here, "src")):
        if "__mypyc." in name:
            os.remove(os.path.join(here, "src", name))
    os.chdir(os.path.join(here, "src"))  # module names follow from paths relative to src/
    try:
        made = list(mypycify(["--config-file", config, *COMPILED], opt_level="3", target_dir=build))
    finally:
        os.chdir(here)
    write_stamp(here, compiled=True)
    return made


if __name__ == "__main__":  # as setuptools runs it; tests import COMPILED and compiler_present
    setup(ext_modules=extensions())
