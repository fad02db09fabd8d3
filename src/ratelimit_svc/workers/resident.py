"""What a started process keeps resident of its programs' files (docs/performance.md (Memory)).

Envoy touches about 60 of its binary's 100 MB while it starts (every extension registers,
descriptors are built), its embedded interpreter maps a library it uses once at import (pyvoy's
HTTP client, pyqwest), and any interpreter maps code it ran only at startup. Those pages are clean
copies of files: once the process serves (Envoy listens; the primary's workers are ready),
``release_file_pages`` unmaps them, the page cache keeps them, and whatever serving still needs is
mapped again on its first access (a minor fault). Only private, read-only file mappings without a
private copy of any page are touched, so nothing the process wrote can be lost: the kernel reads
every released page back from the same file.
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # <sys/mman.h>: private file pages are read back from the file on next access
_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)")


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    resident_kb: int = 0
    private_copy_kb: int = 0  # anonymous (copied-on-write) pages within a file mapping
    locked_kb: int = 0

    @property
    def releasable(self) -> bool:
        """A private file mapping that cannot be written and holds no private copy."""
        return (
            self.path.startswith("/")
            and not self.path.endswith("(deleted)")
            and self.perms[1] == "-"
            and self.perms[3] == "p"
            and self.resident_kb > 0
            and self.private_copy_kb == 0
            and self.locked_kb == 0
        )


def mappings(smaps: str) -> list[Mapping]:
    """The mappings of a ``/proc/<pid>/smaps`` text."""
    found: list[Mapping] = []
    fields: dict[str, int] = {}
    header: re.Match[str] | None = None

    def close() -> None:
        if header is not None:
            found.append(
                Mapping(
                    int(header[1], 16), int(header[2], 16), header[3], header[4].strip(),
                    fields.get("Rss", 0), fields.get("Anonymous", 0), fields.get("Locked", 0),
                )
            )  # fmt: skip

    for line in smaps.splitlines():
        if (match := _HEADER.fullmatch(line)) is not None:
            close()
            header, fields = match, {}
        elif line.endswith(" kB"):
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0])
    close()
    return found


def release_file_pages(smaps_path: str = "/proc/self/smaps") -> int:
    """Unmap this process's releasable file pages (``Mapping.releasable``); the kB released."""
    try:
        with open(smaps_path) as f:
            found = mappings(f.read())
    except OSError as exc:
        log.debug("resident file pages not released: %s", exc)
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for mapping in found:
        if mapping.releasable:
            if madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
                released += mapping.resident_kb
    log.debug("released %d kB of resident file pages", released)
    return released
