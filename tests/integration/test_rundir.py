"""Envoy's run directories are removed by their owner, and swept at the next start when their
owner was killed (docs/transports.md, Operations on pyvoy)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ratelimit_svc.servers.rundir import NAME_PREFIX, RunDirectory, sweep

OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    from ratelimit_svc.servers.rundir import RunDirectory
    run = RunDirectory("test", parent=sys.argv[1])
    open(run.path + "/secret.yaml", "w").write("key")
    child = None
    if sys.argv[2] == "with-child":  # an Envoy that inherits the lock
        child = subprocess.Popen(["sleep", "60"], pass_fds=(run.lock_fd,))
        print(child.pid, flush=True)
    print(run.path, flush=True)
    time.sleep(60)
    """
)


def start_owner(parent: Path, mode: str) -> tuple[subprocess.Popen[str], list[str]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(parent), mode], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    lines = [owner.stdout.readline().strip() for _ in range(2 if mode == "with-child" else 1)]
    return owner, lines


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def test_a_run_directory_is_removed_by_its_owner_and_never_swept_while_it_lives(
    tmp_path: Path,
) -> None:
    with RunDirectory("envoy", parent=str(tmp_path)) as path:
        assert Path(path).name.startswith(NAME_PREFIX + "envoy-")
        assert oct(Path(path).stat().st_mode & 0o777) == "0o700"
        assert sweep(str(tmp_path)) == []
        assert Path(path).is_dir()
    assert not Path(path).exists()


def test_a_killed_owners_directory_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    killed, (killed_path,) = start_owner(tmp_path, "alone")
    alive, (alive_path,) = start_owner(tmp_path, "alone")
    try:
        kill(killed)
        assert Path(killed_path, "secret.yaml").exists()  # nobody could remove it
        assert sweep(str(tmp_path)) == [killed_path]
        assert not Path(killed_path).exists()
        assert Path(alive_path, "secret.yaml").exists()
    finally:
        kill(alive)


def test_a_child_that_inherited_the_lock_keeps_the_directory_after_its_owner_is_killed(
    tmp_path: Path,
) -> None:
    owner, (child_pid, path) = start_owner(tmp_path, "with-child")
    kill(owner)
    try:
        assert sweep(str(tmp_path)) == []  # the Envoy still runs from it
        assert Path(path).is_dir()
    finally:
        os.kill(int(child_pid), signal.SIGKILL)
    wait_exited(int(child_pid))
    assert sweep(str(tmp_path)) == [path]
    assert not Path(path).exists()


def wait_exited(pid: int) -> None:
    """Until ``pid`` has exited (a zombie of whoever adopted it counts: its files are closed)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still runs")


def test_other_names_and_symlinks_are_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "ratelimit-svc-something"
    other.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / f"{NAME_PREFIX}link").symlink_to(target)
    assert sweep(str(tmp_path)) == []
    assert other.is_dir() and target.is_dir()
