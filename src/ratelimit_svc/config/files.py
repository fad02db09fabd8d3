"""Where config files come from (CONFIG_TYPE=FILE): RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
RUNTIME_APPDIRECTORY, read recursively in lexical order, every regular file whatever its extension,
each named by its path relative to that directory (docs/configuration.md (Where files come from)).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RuntimeLocation:
    root: str
    subdirectory: str
    appdirectory: str
    ignore_dotfiles: bool = False

    @property
    def config_dir(self) -> Path | None:
        """None when RUNTIME_SUBDIRECTORY is empty: no file config at all."""
        if not self.subdirectory:
            return None
        return Path(self.root) / self.subdirectory / self.appdirectory


def config_paths(directory: Path, *, ignore_dotfiles: bool = False) -> list[tuple[str, Path]]:
    """The name (path relative to ``directory``) and path of every regular file below it, in
    load order (following symlinks, each real directory once)."""
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not (ignore_dotfiles and d.startswith(".")))
        for filename in sorted(filenames):
            if ignore_dotfiles and filename.startswith("."):
                continue
            path = Path(current) / filename
            if path.is_file():
                found.append((path.relative_to(directory).as_posix(), path))
    # os.walk yields a directory's files before its subdirectories; order by path components
    # instead (``a/x.yaml`` before ``b.yaml``), as Go's filepath.Walk does.
    found.sort(key=lambda item: item[0].split("/"))
    return found


def read_config_files(directory: Path, *, ignore_dotfiles: bool = False) -> list[ConfigFile]:
    """Every regular file below ``directory`` (``config_paths``), read."""
    files: list[ConfigFile] = []
    if not directory.is_dir():
        log.warning("config directory %s does not exist: no rate limit rules", directory)
        return files
    for name, path in config_paths(directory, ignore_dotfiles=ignore_dotfiles):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: error loading config file: {exc}") from None
        files.append(ConfigFile(name, text))
    return files


def load_from_files(
    location: RuntimeLocation, *, merge_domains: bool = False, fixed_windows_only: str = ""
) -> RateLimitConfig | None:
    """Load the whole file config; None when there is no config directory configured."""
    directory = location.config_dir
    if directory is None:
        return None
    files = read_config_files(directory, ignore_dotfiles=location.ignore_dotfiles)
    return load_config(
        files, merge_domains=merge_domains, fixed_windows_only=fixed_windows_only
    )
