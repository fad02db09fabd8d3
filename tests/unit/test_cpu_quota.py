"""The CPU quota read from cgroup files (docs/transports.md, Worker processes): v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, nested groups, and no quota at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit_svc.workers.cpu_quota import affinity_cpus, cgroup_cpu_quota, usable_cpus


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # cgroup v2, the group's own limit
        ({"proc": "0::/kubepods/pod1/c1\n", "fs/kubepods/pod1/c1/cpu.max": "100000 100000\n"}, 1.0),
        # v2: no limit at all
        ({"proc": "0::/\n", "fs/cpu.max": "max 100000\n"}, None),
        # v2: a container whose namespace hides the path: the mount root is its group
        ({"proc": "0::/\n", "fs/cpu.max": "250000 100000\n"}, 2.5),
        # v2: the parent's limit is lower than the child's
        ({"proc": "0::/a/b\n", "fs/a/b/cpu.max": "400000 100000\n", "fs/a/cpu.max": "150000 100000\n"}, 1.5),
        # cgroup v1, cpu and cpuacct co-mounted
        ({"proc": "4:memory:/x\n2:cpu,cpuacct:/pod\n", "fs/cpu,cpuacct/pod/cpu.cfs_quota_us": "50000\n",
          "fs/cpu,cpuacct/pod/cpu.cfs_period_us": "100000\n"}, 0.5),
        # v1: quota -1 means none
        ({"proc": "1:cpu:/\n", "fs/cpu/cpu.cfs_quota_us": "-1\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}, None),
        # v1 under its own mount name "cpu"
        ({"proc": "1:cpu:/job\n", "fs/cpu/job/cpu.cfs_quota_us": "300000\n", "fs/cpu/job/cpu.cfs_period_us": "100000\n"}, 3.0),
        # garbage in the files is no limit, not a crash
        ({"proc": "0::/\n", "fs/cpu.max": "lots\n"}, None),
    ],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        write(tmp_path, "self_cgroup" if name == "proc" else name, text)
    assert cgroup_cpu_quota(tmp_path / "fs", tmp_path / "self_cgroup") == expected


def test_no_cgroup_file_is_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path, tmp_path / "missing") is None


def test_usable_cpus_is_the_quota_rounded_down_and_at_least_one(tmp_path: Path) -> None:
    write(tmp_path, "self_cgroup", "0::/\n")
    write(tmp_path, "fs/cpu.max", "50000 100000\n")  # half a CPU
    assert usable_cpus(tmp_path / "fs", tmp_path / "self_cgroup") == 1
    write(tmp_path, "fs/cpu.max", "6400000 100000\n")  # 64 CPUs: the affinity mask is smaller
    assert usable_cpus(tmp_path / "fs", tmp_path / "self_cgroup") == affinity_cpus()
