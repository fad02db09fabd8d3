"""The config load process (config/load_process.py) as tests reach it: a builder that
``build_in_child`` runs in the child (it takes a module-level function, by reference), and the pid
of the fork server the children are forked from."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import signal


def die() -> None:
    """The load process killed mid-load, as the kernel's out-of-memory killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def fork_server_pid() -> int:
    """The running fork server's pid (multiprocessing has no public way to ask)."""
    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert isinstance(pid, int)
    return pid
