"""The compiled request path (docs/performance.md, Compiled modules): where setup.py could build
them, the listed modules run as extensions; an edited source, or RATELIMIT_SVC_PURE=1, makes them
all run as Python, the edit with a warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.compiled import COMPILED, ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "ratelimit_svc"
STAMP = PACKAGE / "compiled.sha256"
NAMES = [path.removesuffix(".py").replace("/", ".") for path in COMPILED]
WARNING = "the compiled modules were not built from the sources beside them"

pytestmark = pytest.mark.skipif(
    not STAMP.exists(),
    reason="this checkout's modules are not compiled (no C compiler, or RATELIMIT_SVC_PURE=1)",
)


def where_from(src: Path, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Where each compiled module was loaded from, and what the import logged."""
    probe = "import importlib, sys\nfor name in sys.argv[1:]: print(importlib.import_module(name).__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe, *NAMES],
        capture_output=True, text=True, timeout=60, check=True, cwd=src,
        env={**os.environ, "PYTHONPATH": str(src), **(env or {})},
    )  # fmt: skip
    return result.stdout.split(), result.stderr


def copy_tree(tmp_path: Path) -> Path:
    """This checkout's package with its extensions, where a test may edit a source."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "ratelimit_svc", ignore=shutil.ignore_patterns("__pycache__"))
    for shared in SRC.glob("*__mypyc*.so"):  # the library the extensions share
        shutil.copy2(shared, src / shared.name)
    return src


def test_every_listed_module_runs_compiled() -> None:
    paths, logged = where_from(SRC)
    assert len(paths) == len(NAMES)
    assert all(path.endswith(".so") for path in paths), paths
    assert WARNING not in logged


def test_an_edited_source_makes_the_compiled_modules_run_as_python(tmp_path: Path) -> None:
    src = copy_tree(tmp_path)
    assert all(path.endswith(".so") for path in where_from(src)[0])  # the copy as built
    edited = src / COMPILED[-1]
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    paths, logged = where_from(src)
    assert paths == [str(src / path) for path in COMPILED]  # all of them, not only the edited one
    assert WARNING in logged and "make setup" in logged


def test_pure_setting_runs_them_as_python_quietly(tmp_path: Path) -> None:
    paths, logged = where_from(copy_tree(tmp_path), {"RATELIMIT_SVC_PURE": "1"})
    assert all(path.endswith(".py") for path in paths), paths
    assert WARNING not in logged
