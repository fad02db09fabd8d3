"""setup.py's list of compiled modules and its compiler check, for the tests of the compiled
request path (docs/performance.md, Compiled modules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _setup() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ratelimit_svc_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the build, runs none
    return module


SETUP = _setup()
COMPILED: list[str] = SETUP.COMPILED


def compiler_present() -> bool:
    return bool(SETUP.compiler_present())
