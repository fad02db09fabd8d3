"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

A container limited to 1 CPU on a 32-core node sees 32 CPUs in its affinity mask; the limit is
in the cgroup (docs/transports.md, Worker processes): cgroup v2 ``cpu.max`` (``"<quota> <period>"``
or ``"max <period>"``) and cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = none),
in the process's own group and every group above it, the smallest winning. Fractions round down
(at least 1), so workers are never throttled by a quota they cannot fill.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the whole machine elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    cpus = affinity_cpus()
    quota = cgroup_cpu_quota(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def cgroup_cpu_quota(
    root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The CPU quota in CPUs (1.5 = one and a half), or None when there is none (or no cgroup)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            for directory in _groups(root, path):
                limits += filter(None, [_v2_limit(directory / "cpu.max")])
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                for directory in _groups(mount, path):
                    limits += filter(None, [_v1_limit(directory)])
    return min(limits) if limits else None


def _groups(mount: Path, path: str) -> list[Path]:
    """The group's directory and those above it; in a container whose cgroup namespace hides
    the path, the mount's root is the group itself."""
    relative = PurePosixPath(path).relative_to("/") if path.startswith("/") else PurePosixPath(path)
    parts = relative.parts
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(cpu_max: Path) -> float | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no quota
        return None
    return q / p
