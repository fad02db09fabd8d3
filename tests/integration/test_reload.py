"""Hot reload (docs/operations.md (Reload)) through a running App: both RUNTIME_WATCH_ROOT modes, the Kubernetes
ConfigMap layout, coalescing, bad files and deleted files.

Every test changes real files and then waits — with a timeout, never a fixed sleep — for the
watcher's next load, then asserts on the config the App serves. Coalescing is proven by counting
loads: after a burst and one more ("sentinel") change, exactly two loads must have run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from support.service_env import base_env, rules
from watchdog.events import (
    DirCreatedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
)

from ratelimit_svc.app import App
from ratelimit_svc.config.files import RuntimeLocation
from ratelimit_svc.config.watch import WatchSpec, _Handler, plan_watches
from ratelimit_svc.limiter.limiter import Request, RequestDescriptor
from ratelimit_svc.limiter.windows import Code
from ratelimit_svc.settings.model import Settings

LOAD_TIMEOUT = 15.0


def served(app: App) -> dict[str, int]:
    """Domain → the requests_per_unit of its key1 rule, from the config the App serves now."""
    assert app.config is not None
    return {r.stats_key.split(".")[0]: r.requests_per_unit for r in app.config.rules()}


async def next_load(app: App, loads_before: int) -> None:
    assert app.source.watcher is not None
    async with asyncio.timeout(LOAD_TIMEOUT):
        await app.source.watcher.wait_for_loads(loads_before + 1)


async def change_and_wait(app: App, change: Callable[[], object]) -> None:
    """Apply ``change`` to the files (in a thread, so the loop sees events as they come, as in
    production) and wait for the load it causes."""
    assert app.source.watcher is not None
    before = app.source.watcher.loads
    await asyncio.to_thread(change)
    await next_load(app, before)


@asynccontextmanager
async def running(**env: str) -> AsyncIterator[App]:
    async with App(Settings.from_env(base_env(**env))) as app:
        assert app.source.watcher is not None
        yield app


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- RUNTIME_WATCH_ROOT=true --------------------------------------------------------------------


def make_version(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    version = tmp_path / name
    for filename, text in files.items():
        write(version / "ratelimit" / "config" / filename, text)
    return version


def swap_root(tmp_path: Path, target: Path) -> None:
    """``ln -s target tmp && mv -T tmp current``: rename(2) over the old link is atomic."""
    os.symlink(target, tmp_path / "current.tmp")
    os.replace(tmp_path / "current.tmp", tmp_path / "current")


@pytest.fixture
async def root_app(tmp_path: Path) -> AsyncIterator[App]:
    v1 = make_version(tmp_path, "v1", {"a.yaml": rules("alpha", per_minute=1)})
    os.symlink(v1, tmp_path / "current")
    async with running(
        RUNTIME_ROOT=str(tmp_path / "current"), RUNTIME_SUBDIRECTORY="ratelimit",
        RUNTIME_WATCH_ROOT="true",
    ) as app:  # fmt: skip
        assert served(app) == {"alpha": 1}
        yield app


async def test_root_symlink_swap_reloads(root_app: App, tmp_path: Path) -> None:
    v2 = make_version(tmp_path, "v2", {"a.yaml": rules("alpha", per_minute=2), "b.yaml": rules("beta")})
    await change_and_wait(root_app, lambda: swap_root(tmp_path, v2))
    assert served(root_app) == {"alpha": 2, "beta": 2}
    assert root_app.stats.get("ratelimit.service.config_load_success") == 2
    # The watch followed the swap: an in-place edit in the new target reloads too ...
    await change_and_wait(root_app, lambda: write(v2 / "ratelimit" / "config" / "b.yaml", rules("beta", per_minute=9)))
    assert served(root_app) == {"alpha": 2, "beta": 9}


def test_root_mode_reacts_only_to_the_root_entry(tmp_path: Path) -> None:
    """Beside RUNTIME_ROOT new versions are being prepared all the time: not a reason to reload."""
    pokes: list[None] = []
    spec = WatchSpec(str(tmp_path), recursive=False, entries=frozenset({"current"}))
    handler = _Handler(spec, lambda: pokes.append(None), lambda path: False)
    for event in (
        DirCreatedEvent(str(tmp_path / "v3")),
        FileCreatedEvent(str(tmp_path / "current.tmp")),
        FileModifiedEvent(str(tmp_path / "v3" / "ratelimit" / "config" / "a.yaml")),
        FileCreatedEvent(str(tmp_path / "other" / "current")),
    ):
        handler.dispatch(event)
    assert pokes == []
    for event in (
        FileMovedEvent(str(tmp_path / "current.tmp"), str(tmp_path / "current")),
        FileDeletedEvent(str(tmp_path / "current")),
        FileCreatedEvent(str(tmp_path / "current")),
    ):
        handler.dispatch(event)
    assert len(pokes) == 3


async def test_root_mode_reloads_on_in_place_edit(tmp_path: Path) -> None:
    config = tmp_path / "runtime" / "ratelimit" / "config"
    write(config / "a.yaml", rules("alpha", per_minute=1))
    async with running(RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="ratelimit") as app:
        await change_and_wait(app, lambda: write(config / "a.yaml", rules("alpha", per_minute=4)))
        assert served(app) == {"alpha": 4}
        request = Request("alpha", (RequestDescriptor((("key1", "v"),)),))
        decision = await app.service.should_rate_limit(request)
        assert decision.overall is Code.OK and decision.statuses[0].remaining == 3


async def test_root_created_after_start_is_loaded(tmp_path: Path) -> None:
    """No root at start (nothing to serve): its creation by a symlink is seen from its parent."""
    async with running(
        RUNTIME_ROOT=str(tmp_path / "data" / "current"), RUNTIME_SUBDIRECTORY="ratelimit",
    ) as app:  # fmt: skip
        assert served(app) == {}
        v1 = make_version(tmp_path / "data", "v1", {"a.yaml": rules("alpha")})
        await change_and_wait(app, lambda: os.symlink(v1, tmp_path / "data" / "current"))
        assert served(app) == {"alpha": 2}


# -- RUNTIME_WATCH_ROOT=false: the config directory ---------------------------------------------


@pytest.fixture
async def dir_app(tmp_path: Path) -> AsyncIterator[App]:
    write(tmp_path / "runtime" / "ratelimit" / "config" / "a.yaml", rules("alpha", per_minute=1))
    async with running(
        RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="ratelimit",
        RUNTIME_WATCH_ROOT="false",
    ) as app:  # fmt: skip
        yield app


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path / "runtime" / "ratelimit" / "config"


async def test_directory_mode_create_write_delete(dir_app: App, config_dir: Path) -> None:
    await change_and_wait(dir_app, lambda: write(config_dir / "b.yaml", rules("beta")))
    assert served(dir_app) == {"alpha": 1, "beta": 2}
    await change_and_wait(dir_app, lambda: write(config_dir / "b.yaml", rules("beta", per_minute=8)))
    assert served(dir_app) == {"alpha": 1, "beta": 8}
    await change_and_wait(dir_app, lambda: write(config_dir / "team" / "c.yaml", rules("gamma")))
    assert served(dir_app) == {"alpha": 1, "beta": 8, "gamma": 2}
    await change_and_wait(dir_app, (config_dir / "b.yaml").unlink)
    assert served(dir_app) == {"alpha": 1, "gamma": 2}
    await change_and_wait(dir_app, lambda: shutil.rmtree(config_dir / "team"))
    assert served(dir_app) == {"alpha": 1}
    # A deleted file unloads: the domain is unknown again, so its requests are not limited.
    await change_and_wait(dir_app, (config_dir / "a.yaml").unlink)
    assert served(dir_app) == {}
    decision = await dir_app.service.should_rate_limit(Request("alpha", (RequestDescriptor((("key1", "v"),)),)))
    assert decision.statuses[0].rule is None


async def test_directory_mode_moves(dir_app: App, config_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "incoming.yaml"
    outside.write_text(rules("beta"))
    await change_and_wait(dir_app, lambda: os.rename(outside, config_dir / "b.yaml"))
    assert served(dir_app) == {"alpha": 1, "beta": 2}
    # An editor's save: write a temporary file, rename it over the original.
    write(config_dir / ".a.yaml.swp", rules("alpha", per_minute=6))
    await change_and_wait(dir_app, lambda: os.replace(config_dir / ".a.yaml.swp", config_dir / "a.yaml"))
    assert served(dir_app) == {"alpha": 6, "beta": 2}
    await change_and_wait(dir_app, lambda: os.rename(config_dir / "b.yaml", tmp_path / "gone.yaml"))
    assert served(dir_app) == {"alpha": 6}


@pytest.mark.parametrize("level", ["config", "ratelimit"])
async def test_a_directory_replaced_by_rename_is_followed(
    dir_app: App, tmp_path: Path, level: str
) -> None:
    """``mv config config.old && mv new config`` (or one level up): the new directory is
    loaded, and later edits inside it are seen (docs/reliability.md)."""
    replaced = tmp_path / "runtime" / "ratelimit"
    if level == "config":
        replaced = replaced / "config"
    new = tmp_path / "new"
    config_inside_new = new if level == "config" else new / "config"
    write(config_inside_new / "a.yaml", rules("alpha", per_minute=4))

    def swap() -> None:
        os.rename(replaced, tmp_path / "old")
        os.rename(new, replaced)

    await change_and_wait(dir_app, swap)
    assert served(dir_app) == {"alpha": 4}
    config_dir = tmp_path / "runtime" / "ratelimit" / "config"
    await change_and_wait(dir_app, lambda: write(config_dir / "a.yaml", rules("alpha", per_minute=5)))
    assert served(dir_app) == {"alpha": 5}


async def test_directory_mode_chmod_reloads(dir_app: App, config_dir: Path) -> None:
    assert dir_app.source.watcher is not None
    await change_and_wait(dir_app, lambda: os.chmod(config_dir / "a.yaml", 0o600))
    assert dir_app.source.watcher.loads == 1
    assert served(dir_app) == {"alpha": 1}


async def test_directory_created_after_start_is_loaded(tmp_path: Path) -> None:
    async with running(
        RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="ratelimit",
        RUNTIME_WATCH_ROOT="false",
    ) as app:  # fmt: skip
        assert served(app) == {}
        # Created one level at a time, as mkdir -p does: the watch moves down each time.
        config = tmp_path / "runtime" / "ratelimit" / "config"
        for level in (tmp_path / "runtime", tmp_path / "runtime" / "ratelimit", config):
            await change_and_wait(app, level.mkdir)
        await change_and_wait(app, lambda: write(config / "a.yaml", rules("alpha")))
        assert served(app) == {"alpha": 2}


# -- Kubernetes ConfigMap layout ----------------------------------------------------------------


class ConfigMapVolume:
    """What the kubelet's atomic writer does in a ConfigMap volume mounted at ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0
        directory.mkdir(parents=True)

    def update(self, files: dict[str, str]) -> None:
        d = self.directory
        self.generation += 1
        old = os.readlink(d / "..data") if (d / "..data").is_symlink() else None
        version = d / f"..2024_01_01_00_00_0{self.generation}.{1000 + self.generation}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text)
        os.symlink(version.name, d / "..data_tmp")
        os.replace(d / "..data_tmp", d / "..data")
        for name in files:
            if not (d / name).is_symlink():
                os.symlink(f"..data/{name}", d / name)
        for link in d.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
                link.unlink()
        if old is not None:
            shutil.rmtree(d / old)


async def test_kubernetes_configmap_swap(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "runtime" / "ratelimit" / "config")
    volume.update({"a.yaml": rules("alpha", per_minute=1)})
    async with running(
        RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="ratelimit",
        RUNTIME_WATCH_ROOT="false", RUNTIME_IGNOREDOTFILES="true",
    ) as app:  # fmt: skip
        assert app.source.watcher is not None
        assert served(app) == {"alpha": 1}
        # One update is a dozen file system events: it must cost exactly one load.
        await change_and_wait(app, lambda: volume.update({"a.yaml": rules("alpha", per_minute=2), "b.yaml": rules("beta")}))
        assert served(app) == {"alpha": 2, "beta": 2}
        await change_and_wait(app, lambda: volume.update({"b.yaml": rules("beta", per_minute=7)}))
        assert served(app) == {"beta": 7}
        assert app.source.watcher.loads == 2
        assert app.stats.get("ratelimit.service.config_load_error") == 0


# -- coalescing, bad files ----------------------------------------------------------------------


async def test_a_burst_of_changes_is_one_load(dir_app: App, config_dir: Path) -> None:
    assert dir_app.source.watcher is not None

    def burst() -> None:
        # A slow writer (rsync, a deploy script): events keep coming for ~0.2s, never more than
        # a few milliseconds apart.
        for n in range(30):
            write(config_dir / f"d{n}.yaml", rules(f"d{n}", per_minute=n + 1))
            os.chmod(config_dir / f"d{n}.yaml", 0o644)
            time.sleep(0.005)  # pacing the writer, not waiting for a result

    await change_and_wait(dir_app, burst)
    await change_and_wait(dir_app, lambda: write(config_dir / "sentinel.yaml", rules("sentinel")))
    assert len(served(dir_app)) == 32
    assert dir_app.source.watcher.loads == 2
    assert dir_app.stats.get("ratelimit.service.config_load_success") == 3  # with the first load


async def test_bad_file_keeps_the_old_config(
    dir_app: App, config_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = dir_app.config
    with caplog.at_level(logging.INFO, logger="ratelimit_svc"):
        await change_and_wait(dir_app, lambda: write(config_dir / "bad.yaml", "domain: bad\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"))
        assert dir_app.config is good
        assert dir_app.stats.get("ratelimit.service.config_load_error") == 1
        errors = [m for m in caplog.messages if m.startswith("Error loading new configuration: ")]
        assert len(errors) == 1 and "bad.yaml" in errors[0]
        await change_and_wait(dir_app, lambda: write(config_dir / "bad.yaml", rules("fixed")))
    assert served(dir_app) == {"alpha": 1, "fixed": 2}
    assert "Successfully loaded new configuration" in caplog.messages
    assert dir_app.stats.get("ratelimit.service.config_load_success") == 2


async def test_no_watcher_without_a_runtime_subdirectory(tmp_path: Path) -> None:
    async with App(Settings.from_env(base_env(RUNTIME_ROOT=str(tmp_path), RUNTIME_SUBDIRECTORY=""))) as app:
        assert app.source.watcher is None


def test_plan_watches_per_mode(tmp_path: Path) -> None:
    tmp_path = Path(os.path.realpath(tmp_path))
    config = tmp_path / "current" / "rl" / "config"
    config.mkdir(parents=True)
    location = RuntimeLocation(str(tmp_path / "current"), "rl", "config")
    # Each directory below the root is watched by name in its parent (a rename replaces it).
    by_name = [(str(tmp_path / "current"), False, frozenset({"rl"})), (str(config.parent), False, frozenset({"config"}))]
    root_mode = plan_watches(location, watch_root=True)
    assert [(w.path, w.recursive, w.entries) for w in root_mode] == sorted([
        (str(tmp_path), False, frozenset({"current"})),
        *by_name,
        (str(config), True, None),
    ])  # fmt: skip
    assert [(w.path, w.recursive, w.entries) for w in plan_watches(location, watch_root=False)] == sorted([
        *by_name, (str(config), True, None)
    ])  # fmt: skip
    assert root_mode[-1].inode == (config.stat().st_dev, config.stat().st_ino)
    missing = RuntimeLocation(str(tmp_path / "nothing" / "here"), "rl", "config")
    assert [(w.path, w.recursive, w.entries) for w in plan_watches(missing, watch_root=False)] == [
        (str(tmp_path), False, frozenset({"nothing"}))
    ]
