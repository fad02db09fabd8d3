"""Where config files come from (CONFIG_TYPE=FILE): RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
RUNTIME_APPDIRECTORY, read recursively in lexical order, every regular file whatever its extension,
each named by its path relative to that directory (docs/configuration.md (Where files come from)).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.config.rules import RateLimitConfig
from ratelimit_svc.errors import ConfigError
from ratelimit_svc.settings.model import CONFIG_MAX_FILE_BYTES

log = logging.getLogger(__name__)


# Names editors give their swap, backup and lock files (vim, emacs, nano and the like).
EDITOR_PATTERNS = ("*~", "*.swp", "*.swx", "*.swo", ".#*", "#*#", "4913", "*.tmp", "*.bak")


@dataclass(frozen=True, slots=True)
class RuntimeLocation:
    root: str
    subdirectory: str
    appdirectory: str
    ignore_dotfiles: bool = False
    ignore_patterns: tuple[str, ...] = ()  # RUNTIME_IGNORE_PATTERNS
    max_file_bytes: int = CONFIG_MAX_FILE_BYTES  # CONFIG_MAX_FILE_BYTES (docs/reliability.md)

    @property
    def config_dir(self) -> Path | None:
        """None when RUNTIME_SUBDIRECTORY is empty: no file config at all."""
        if not self.subdirectory:
            return None
        return Path(self.root) / self.subdirectory / self.appdirectory

    def ignores(self, name: str) -> bool:
        """Whether a file or directory called ``name`` is skipped (neither read nor watched)."""
        if self.ignore_dotfiles and name.startswith("."):
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore_patterns)


def output_files() -> frozenset[tuple[int, int]]:
    """(device, inode) of the regular files this process's stdout and stderr write to: a log
    redirected into the config directory is neither loaded nor watched (each line logged about
    it would change it again)."""
    found = set()
    for fd in (1, 2):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            found.add((info.st_dev, info.st_ino))
    return frozenset(found)


def is_output_file(path: str | Path, outputs: frozenset[tuple[int, int]]) -> bool:
    if not outputs:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) in outputs


def _directory_problem(directory: Path) -> str | None:
    """Why the config directory cannot be listed, in a few words; None when it can."""
    try:
        with os.scandir(directory):
            return None
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "is not a directory"
    except PermissionError:
        return f"cannot be read by this user (uid {os.getuid()}): permission denied"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"


def config_paths(
    directory: Path, *, location: RuntimeLocation | None = None
) -> list[tuple[str, Path]]:
    """The name (path relative to ``directory``) and path of every regular file below it, in load
    order (following symlinks, each real directory once), except those ``location`` ignores and
    this process's own log file. An unreadable directory anywhere below is a ConfigError."""
    ignores = location.ignores if location is not None else (lambda name: False)
    outputs = output_files()
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()

    def walk_error(exc: OSError) -> None:
        raise ConfigError(f"config directory {exc.filename} cannot be read: {exc.strerror}")

    for current, dirnames, filenames in os.walk(directory, followlinks=True, onerror=walk_error):
        real = os.path.realpath(current)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not ignores(d))
        for filename in sorted(filenames):
            if ignores(filename):
                continue
            path = Path(current) / filename
            # _has_mode: an entry that cannot be looked at fails the load (docs/reliability.md)
            if _has_mode(path, stat.S_ISREG, "file") and not is_output_file(path, outputs):
                found.append((path.relative_to(directory).as_posix(), path))
    # os.walk yields a directory's files before its subdirectories; order by path components
    # instead (``a/x.yaml`` before ``b.yaml``), as Go's filepath.Walk does.
    found.sort(key=lambda item: item[0].split("/"))
    return found


def read_config_files(
    directory: Path, *, location: RuntimeLocation | None = None, max_file_bytes: int | None = None
) -> list[ConfigFile]:
    """Every file ``config_paths`` lists, read; one larger than ``max_file_bytes`` (default: the
    location's CONFIG_MAX_FILE_BYTES) fails the load, named (docs/reliability.md)."""
    if max_file_bytes is None:
        max_file_bytes = location.max_file_bytes if location else CONFIG_MAX_FILE_BYTES
    problem = _directory_problem(directory)
    if problem == "does not exist":
        log.warning("config directory %s does not exist: no rate limit rules", directory)
        return []
    if problem is not None:
        raise ConfigError(f"config directory {directory} {problem}")
    files: list[ConfigFile] = []
    for name, path in config_paths(directory, location=location):
        try:
            text = _read_capped(path, name, max_file_bytes)
        except (OSError, UnicodeDecodeError) as exc:
            message = f"{name}: error loading config file: {exc}"
            raise ConfigError(_with_hint(name, message)) from None
        files.append(ConfigFile(name, text))
    return files


def _has_mode(path: Path, test: Callable[[int], bool], what: str) -> bool:
    """``test`` on the mode of ``path`` (following symlinks); False when nothing is there (a
    dangling symlink or a symlink loop), ConfigError when it cannot be looked at (no search
    permission on a directory on the way)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise ConfigError(f"config {what} {path} cannot be read: {exc.strerror or exc}") from None
    return test(mode)


def _read_capped(path: Path, name: str, max_bytes: int) -> str:
    """The file's text; refused unread when larger than ``max_bytes`` (checked again while
    reading, since the file may grow meanwhile)."""
    too_big = f"{name}: error loading config file: larger than CONFIG_MAX_FILE_BYTES"
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise ConfigError(f"{too_big} ({size} > {max_bytes} bytes)")
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{too_big} ({max_bytes} bytes)")
    return data.decode("utf-8")


def _with_hint(name: str, message: str) -> str:
    """``message``, plus the settings that skip ``name`` when it looks like an editor's file."""
    base = name.rsplit("/", 1)[-1]
    if not any(fnmatch.fnmatchcase(base, pattern) for pattern in EDITOR_PATTERNS):
        return message
    return (
        f"{message} ({name} looks like an editor's swap or backup file, not rules: "
        "RUNTIME_IGNOREDOTFILES=true skips dot-files, RUNTIME_IGNORE_PATTERNS="
        f"'{','.join(EDITOR_PATTERNS)}' skips these names)"
    )


def load_from_files(
    location: RuntimeLocation, *, merge_domains: bool = False, fixed_windows_only: str = ""
) -> RateLimitConfig | None:
    """Load the whole file config; None when there is no config directory configured."""
    directory = location.config_dir
    if directory is None:
        return None
    files = read_config_files(directory, location=location)
    try:
        return load_config(
            files, merge_domains=merge_domains, fixed_windows_only=fixed_windows_only
        )
    except ConfigError as exc:
        failing = [f.name for f in files if str(exc).startswith(f"{f.name}:")]
        if failing:
            raise ConfigError(_with_hint(failing[0], str(exc))) from None
        raise
