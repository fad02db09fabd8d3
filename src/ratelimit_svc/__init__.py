"""ratelimit-svc: Envoy's global rate-limit service (envoyproxy/ratelimit compatible), in Python.

Importing the package first checks that the compiled request-path modules (setup.py, mypyc) were
built from the sources beside them; where they were not, or with RATELIMIT_SVC_PURE=1, those
modules run as Python (docs/performance.md, Compiled modules)."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

# Written by setup.py when it compiles: "<sha256 of the source>  <path under the package>" per line.
COMPILED_STAMP = "compiled.sha256"
_HERE = os.path.dirname(os.path.abspath(__file__))
_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the listed modules' ``.py`` files before their (stale) extensions."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def _compiled_modules() -> dict[str, str]:
    """Module name → source path of every module with an extension built beside its source."""
    found: dict[str, str] = {}
    for directory, subdirectories, files in os.walk(_HERE):
        subdirectories[:] = [d for d in subdirectories if d != "__pycache__"]
        for name in files:
            stem = name.partition(".")[0]
            if name.endswith(_EXTENSIONS) and stem + ".py" in files:
                relative = os.path.relpath(os.path.join(directory, stem), _HERE)
                found[".".join([__name__, *relative.split(os.sep)])] = os.path.join(
                    directory, stem + ".py"
                )
    return found


def _stale(modules: dict[str, str]) -> bool:
    """Whether the stamp is missing or names a source that changed since the build."""
    try:
        with open(os.path.join(_HERE, COMPILED_STAMP)) as f:
            lines = f.read().splitlines()
    except OSError:
        return True
    built: dict[str, str] = {}
    for line in lines:
        digest, _, path = line.partition("  ")
        built[path] = digest
    for source in modules.values():
        with open(source, "rb") as f:
            if built.get(os.path.relpath(source, _HERE)) != hashlib.sha256(f.read()).hexdigest():
                return True
    return False


def _check_compiled() -> None:
    modules = _compiled_modules()
    if not modules:
        return
    pure = os.environ.get("RATELIMIT_SVC_PURE") == "1"  # asked for: the Python, silently
    if not pure and not _stale(modules):
        return
    sys.meta_path.insert(0, _SourceFirst(modules))
    if not pure:
        logging.getLogger(__name__).warning(
            "the compiled modules were not built from the sources beside them: running them as "
            "Python (rebuild with `make setup` or `pip install -e .`)"
        )

_check_compiled()
