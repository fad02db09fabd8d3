"""The local over-limit cache: counter keys known to be over their limit until their window ends,
bounded by an estimate of its bytes (LOCAL_CACHE_SIZE_IN_BYTES), oldest entries evicted first
(docs/backends.md (Local over-limit cache)).
"""

from __future__ import annotations

from collections import OrderedDict

ENTRY_OVERHEAD_BYTES = 64


class LocalCache:
    """Keys that are over limit, each with the Unix second at which its window ends."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, int] = OrderedDict()
        self.hit_count = 0
        self.miss_count = 0
        self.evacuate_count = 0
        self.expired_count = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(key: str) -> int:
        return len(key.encode()) + ENTRY_OVERHEAD_BYTES

    def holds(self, key: str, now: int) -> bool:
        """Like ``contains`` but counting nothing and removing nothing (a dry run's look)."""
        expires_at = self._entries.get(key)
        return expires_at is not None and expires_at > now

    def contains(self, key: str, now: int) -> bool:
        expires_at = self._entries.get(key)
        if expires_at is None:
            self.miss_count += 1
            return False
        if expires_at <= now:
            self._remove(key)
            self.expired_count += 1
            self.miss_count += 1
            return False
        self.hit_count += 1
        return True

    def add(self, key: str, expires_at: int) -> None:
        size = self._size(key)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        while self._entries and self.used_bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.evacuate_count += 1
        self._entries[key] = expires_at
        self.used_bytes += size

    def _remove(self, key: str) -> None:
        del self._entries[key]
        self.used_bytes -= self._size(key)
