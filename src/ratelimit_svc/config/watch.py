"""The file watcher (CONFIG_TYPE=FILE): watches what RUNTIME_WATCH_ROOT says with watchdog
(the root's symlink swap and the config directory, or the config directory alone), coalesces a
burst of events and asks for one reload per burst, without ever missing a change; a directory that
does not exist yet is waited for, and one replaced by rename followed (docs/operations.md (Reload),
docs/reliability.md). Each load is awaited (it runs in a child process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ratelimit_svc.config.files import RuntimeLocation, is_output_file, output_files

log = logging.getLogger(__name__)

QUIET_SECONDS = 0.2
MAX_DELAY_SECONDS = 2.0

# Changes only: our own reads (open, close-without-write) must never trigger a reload.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    DirAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """Watch ``path``; ``entries`` None = every event, else only events on these child names.

    ``inode`` (device, inode) is the directory the watch was planned for: a directory replaced
    by another under the same name is a different spec, so the watch moves to the new one (an
    inotify watch follows the inode it was put on, wherever that is renamed to)."""

    path: str
    recursive: bool
    entries: frozenset[str] | None
    inode: tuple[int, int] | None = None


def _entry_watch(target: str) -> tuple[str, str]:
    """(directory to watch, child name) that reveals a change of ``target``'s path.

    That is the parent of ``target`` when it exists, else the nearest existing ancestor, watched
    for the next component on the way down.
    """
    child, parent = target, os.path.dirname(target)
    while not os.path.isdir(parent) and parent != os.path.dirname(parent):
        child, parent = parent, os.path.dirname(parent)
    return os.path.realpath(parent), os.path.basename(child)


def plan_watches(location: RuntimeLocation, *, watch_root: bool) -> list[WatchSpec]:
    """What to watch now; called again before every load, since the root may have moved."""
    config_dir = location.config_dir
    if config_dir is None:
        return []
    wanted: dict[tuple[str, bool], set[str] | None] = {}

    def add(path: str, entry: str | None, *, recursive: bool) -> None:
        key = (path, recursive)
        if entry is None:
            wanted[key] = None
        elif key not in wanted:
            wanted[key] = {entry}
        elif (entries := wanted[key]) is not None:
            entries.add(entry)

    root = os.path.abspath(location.root)
    if watch_root:
        add(*_entry_watch(root), recursive=False)
    directory = os.path.abspath(config_dir)
    # Every directory from below the root down to the config directory, by name in its parent:
    # one replaced by rename (``mv new config``) is a change, and the next plan watches the new
    # one (docs/reliability.md).
    below_root = os.path.relpath(directory, root).split(os.sep)
    for depth in range(len(below_root)):
        if below_root[depth] not in (os.curdir, os.pardir):
            component = os.path.join(root, *below_root[: depth + 1])
            if os.path.isdir(os.path.dirname(component)):
                add(*_entry_watch(component), recursive=False)
    if os.path.isdir(directory):
        add(os.path.realpath(directory), None, recursive=True)
    else:
        add(*_entry_watch(directory), recursive=False)
    return [
        WatchSpec(path, recursive, None if entries is None else frozenset(entries), _inode(path))
        for (path, recursive), entries in sorted(wanted.items())
    ]


def _inode(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class _Handler(FileSystemEventHandler):
    def __init__(
        self, spec: WatchSpec, poke: Callable[[], None], ignored: Callable[[str], bool]
    ) -> None:
        super().__init__()
        self.spec = spec
        self.poke = poke
        self.ignored = ignored

    def dispatch(self, event: FileSystemEvent) -> None:
        paths = [p for p in (os.fsdecode(event.src_path), os.fsdecode(event.dest_path or "")) if p]
        entries = self.spec.entries
        if entries is not None:
            if not any(
                os.path.dirname(p) == self.spec.path and os.path.basename(p) in entries
                for p in paths
            ):
                return
        elif all(self.ignored(p) for p in paths):
            return  # an editor's swap file, our own log file: nothing a load would read
        log.debug("config watch: %s %s", event.event_type, event.src_path)
        self.poke()


class ConfigWatcher:
    """Watches the config files and calls ``reload()`` once per burst of changes.

    Use as ``async with ConfigWatcher(location, watch_root=..., reload=app.reload):``; the task and
    the watchdog threads it owns are stopped and awaited on exit.
    """

    def __init__(
        self,
        location: RuntimeLocation,
        *,
        watch_root: bool,
        reload: Callable[[], Awaitable[object]],
        quiet: float = QUIET_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
    ) -> None:
        self.location = location
        self.watch_root = watch_root
        self._reload = reload
        self.quiet = quiet
        self.max_delay = max_delay
        self.loads = 0  # loads run by this watcher; see wait_for_loads
        self._loaded = asyncio.Condition()
        self._changed = asyncio.Event()
        self._observer: Any = None
        self._watches: dict[WatchSpec, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._replanning: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs = output_files()

    def _ignored(self, path: str) -> bool:
        """An event on ``path`` cannot change what a load reads: a name RUNTIME_IGNORE_PATTERNS
        skips, or this process's log file. (Dot-files are not skipped here: in a Kubernetes
        ConfigMap every change is a rename of the kubelet's ``..data`` link.)"""
        location = self.location
        if location.ignore_patterns and replace(location, ignore_dotfiles=False).ignores(
            os.path.basename(path)
        ):
            return True
        return is_output_file(path, self._outputs)

    async def __aenter__(self) -> ConfigWatcher:
        self._loop = asyncio.get_running_loop()
        self._observer = Observer()
        self._observer.start()
        try:
            await asyncio.to_thread(self._replan)
        except BaseException:
            await self._stop_observer()
            raise
        self._task = self._loop.create_task(self._run(), name="config-reload")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._replanning is not None:  # a worker thread still (un)scheduling: let it finish
            with contextlib.suppress(Exception):
                await self._replanning
        await self._stop_observer()

    async def wait_for_loads(self, count: int) -> None:
        """Return once ``count`` loads have run (since start)."""
        async with self._loaded:
            await self._loaded.wait_for(lambda: self.loads >= count)

    # -- watchdog thread → event loop ------------------------------------------------------

    def _poke(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to reload
            loop.call_soon_threadsafe(self._changed.set)

    # -- event loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            await self._settle()
            # Shielded: cancelling this task must not leave the thread working on the observer
            # while it is being stopped; __aexit__ waits for it instead.
            self._replanning = asyncio.ensure_future(asyncio.to_thread(self._replan))
            try:
                await asyncio.shield(self._replanning)
                await self._reload()
            except Exception:  # a bug, not a bad file (that is the loader's ConfigError)
                log.exception("unexpected error while reloading the configuration")
            async with self._loaded:
                self.loads += 1
                self._loaded.notify_all()

    async def _settle(self) -> None:
        """Return once no event came for ``quiet`` seconds, or ``max_delay`` after the first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay
        while True:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(min(self.quiet, remaining)):
                    await self._changed.wait()
            except TimeoutError:
                return

    # -- watches (run in a worker thread: scheduling walks directories and joins threads) ----

    def _replan(self) -> None:
        observer = self._observer
        wanted = plan_watches(self.location, watch_root=self.watch_root)
        alive = {emitter.watch for emitter in set(observer.emitters) if emitter.is_alive()}
        for spec, watch in list(self._watches.items()):
            # A watch whose directory was deleted has stopped: drop it, and re-create it if wanted.
            if spec not in wanted or watch not in alive:
                with contextlib.suppress(KeyError):
                    observer.unschedule(watch)
                del self._watches[spec]
        for spec in wanted:
            if spec in self._watches:
                continue
            try:
                self._watches[spec] = observer.schedule(
                    _Handler(spec, self._poke, self._ignored),
                    spec.path,
                    recursive=spec.recursive,
                    event_filter=EVENT_FILTER,
                )
            except FileNotFoundError:
                # The directory vanished between planning and watching: plan again.
                self._poke()
            except OSError as exc:  # e.g. out of inotify watches; the next round tries again
                log.warning("cannot watch %s for config changes: %s", spec.path, exc)

    async def _stop_observer(self) -> None:
        observer = self._observer
        if observer is None:
            return
        self._observer = None
        self._watches.clear()
        observer.stop()
        await asyncio.to_thread(observer.join)
