"""Releasing a started process's clean file pages (docs/performance.md (Memory)): which mappings
qualify, and that released pages read back the same while written ones are never touched."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from ratelimit_svc.workers.resident import Mapping, mappings, release_file_pages

PAGE = mmap.PAGESIZE
SMAPS = """\
5600a0000000-5600a4000000 r-xp 00001000 fd:01 123 /opt/envoy/bin/envoy
Rss:               38016 kB
Anonymous:             0 kB
Locked:                0 kB
5600a4000000-5600a4300000 r--p 04001000 fd:01 123 /opt/envoy/bin/envoy
Rss:                3464 kB
Anonymous:          3464 kB
Locked:                0 kB
5600a4300000-5600a4380000 rw-p 04301000 fd:01 123 /opt/envoy/bin/envoy
Rss:                 452 kB
Anonymous:           452 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Rss:                4032 kB
Anonymous:          4032 kB
7f0000400000-7f0000500000 r--s 00000000 fd:01 9 /dev/shm/segment
Rss:                1024 kB
Anonymous:             0 kB
7f0000500000-7f0000600000 r--p 00000000 fd:01 7 /tmp/gone (deleted)
Rss:                1024 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r--p 00000000 fd:01 8 /usr/lib/libpinned.so
Rss:                1024 kB
Anonymous:             0 kB
Locked:             1024 kB
7f0000700000-7f0000800000 r--p 00000000 fd:01 8 /usr/lib/libcold.so
Rss:                   0 kB
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
"""


def test_only_clean_private_read_only_file_mappings_are_releasable() -> None:
    found = {(m.start, m.perms): m for m in mappings(SMAPS)}
    assert len(found) == 9
    text = found[(0x5600A0000000, "r-xp")]
    assert text == Mapping(0x5600A0000000, 0x5600A4000000, "r-xp", "/opt/envoy/bin/envoy", 38016, 0, 0)
    assert [m.path for m in mappings(SMAPS) if m.releasable] == ["/opt/envoy/bin/envoy"]
    # why each other one is kept: relocated (a private copy), writable, anonymous, shared,
    # deleted, locked, nothing resident, not a file
    kept = [m for m in mappings(SMAPS) if not m.releasable]
    assert [m.perms for m in kept] == ["r--p", "rw-p", "rw-p", "r--s", "r--p", "r--p", "r--p", "r-xp"]


def resident_kb(start: int) -> int:
    """Rss of this process's mapping that starts at ``start``."""
    with open("/proc/self/smaps") as f:
        return next(m.resident_kb for m in mappings(f.read()) if m.start == start)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * (16 * PAGE // 256))
    return path


def address(mapped: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mapped))


def test_released_pages_leave_the_process_and_read_back_the_same(data_file: Path) -> None:
    expected = data_file.read_bytes()
    with open(data_file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE)
    view = memoryview(mapped)  # ctypes cannot point into a read-only buffer: find it in smaps
    try:
        assert bytes(view) == expected  # every page touched: resident
        with open("/proc/self/smaps") as f:
            ours = [m for m in mappings(f.read()) if m.path == str(data_file)]
        assert len(ours) == 1 and ours[0].resident_kb == 16 * PAGE // 1024 and ours[0].releasable
        released = release_file_pages()
        assert released >= ours[0].resident_kb
        assert resident_kb(ours[0].start) == 0
        assert bytes(view) == expected  # read back from the file
    finally:
        view.release()
        mapped.close()


def test_written_pages_of_a_private_file_mapping_are_kept(data_file: Path) -> None:
    """A copy-on-write page holds what the process wrote: it is never released (the file would
    be read back in its place)."""
    with open(data_file, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        mapped[:4] = b"ours"
        release_file_pages()
        assert mapped[:4] == b"ours"
        assert data_file.read_bytes()[:4] == bytes(range(4))
        assert resident_kb(address(mapped)) >= PAGE // 1024
    finally:
        mapped.close()
