"""Limits on what a config load reads (docs/reliability.md): CONFIG_MAX_FILE_BYTES, and a
directory that cannot be listed failing the load by name instead of dropping its rules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from support.service_env import rules

from ratelimit_svc.config.files import read_config_files
from ratelimit_svc.errors import ConfigError
from ratelimit_svc.settings.model import Settings


def test_size_cap_counts_bytes_and_allows_exactly_the_cap(tmp_path: Path) -> None:
    text = rules("alpha")
    (tmp_path / "a.yaml").write_text(text)
    size = len(text.encode())
    assert [f.name for f in read_config_files(tmp_path, max_file_bytes=size)] == ["a.yaml"]
    with pytest.raises(ConfigError, match=rf"^a.yaml: .*CONFIG_MAX_FILE_BYTES \({size} > {size - 1}"):
        read_config_files(tmp_path, max_file_bytes=size - 1)


def test_config_max_file_bytes_setting() -> None:
    assert Settings.from_env({}).config_max_file_bytes == 16 * 1024 * 1024
    assert Settings.from_env({"CONFIG_MAX_FILE_BYTES": "1000"}).config_max_file_bytes == 1000


def test_an_unlistable_subdirectory_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walker's error is injected (root reads anything); the real thing is the next test."""
    (tmp_path / "a.yaml").write_text(rules("alpha"))
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "b.yaml").write_text(rules("beta"))
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str]) -> Any:
        if os.fspath(path).endswith("team"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError) as caught:
        read_config_files(tmp_path)
    assert str(caught.value) == f"config directory {tmp_path / 'team'} cannot be read: Permission denied"
