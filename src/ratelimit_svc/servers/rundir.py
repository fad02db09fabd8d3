"""The private directories an Envoy runs from (its admin socket, and with TLS the SDS files that
hold the certificate and key): made in the temporary directory, removed by their owner when it
stops, and swept at the next start when the owner was killed and could not remove its own
(docs/transports.md, Operations on pyvoy: TLS and mTLS).

Each directory is locked (``flock``) by its owner for as long as it lives, so a directory whose
lock can be taken belongs to a process that has gone, in whichever PID namespace it ran. A
directory is locked before it gets the name the sweep looks for: one being created is never
swept.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

NAME_PREFIX = "ratelimit-svc-run-"  # a directory the sweep may remove once its lock is free
_NEW_PREFIX = "ratelimit-svc-new-"  # being made: not locked yet, never swept


class RunDirectory:
    """One locked run directory; ``remove`` deletes it (also on exit from ``with``)."""

    def __init__(self, label: str, parent: str | None = None) -> None:
        made = tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{label}-", dir=parent)
        self._lock = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else holds it
        unique = os.path.basename(made).removeprefix(_NEW_PREFIX)
        self.path = os.path.join(os.path.dirname(made), NAME_PREFIX + unique)
        os.rename(made, self.path)  # the lock follows the directory

    @property
    def lock_fd(self) -> int:
        """The locked descriptor: a child that inherits it keeps the directory from the sweep
        for as long as it runs, even if this process is killed first."""
        return self._lock

    def remove(self) -> None:
        if self._lock < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)
        self._lock = -1

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.remove()


def sweep(parent: str | None = None) -> list[str]:
    """Remove the run directories of owners that have gone (killed before they could); the
    paths removed. Directories of other users and locked ones are left alone."""
    removed: list[str] = []
    try:
        candidates = list(Path(parent or tempfile.gettempdir()).glob(NAME_PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.geteuid():
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(str(path))
    if removed:
        log.info("removed %d run directories left by stopped processes", len(removed))
    return removed
