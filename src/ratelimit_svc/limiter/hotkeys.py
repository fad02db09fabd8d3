"""The counters nearest to or over their limit right now, in a table of bounded size.

The limiter tells ``HotKeys`` of every counted descriptor whose count passed the near-limit
threshold; the operator's console shows the top of the table (docs/console.md). The table holds at
most ``2 * capacity`` counters and values cut to ``max_value_chars``, so a flood of distinct hostile
values costs bounded memory: when it is full, counters whose window has ended go first, then the
ones furthest below their limit. Recording is a dict lookup for a counter seen before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Entry = tuple[str, str]

DEFAULT_CAPACITY = 100
DEFAULT_MAX_VALUE_CHARS = 256


@dataclass(slots=True)
class HotKey:
    """One counter: ``count`` in a window of ``limit`` that ends at ``reset_at`` (epoch seconds)."""

    key: str
    domain: str
    entries: tuple[Entry, ...]
    stats_key: str
    count: int
    limit: int
    reset_at: int

    @property
    def ratio(self) -> float:
        return self.count / self.limit if self.limit else float("inf")

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "key": self.key,
            "domain": self.domain,
            "descriptor": [{"key": k, "value": v} for k, v in self.entries],
            "rule": self.stats_key,
            "count": self.count,
            "limit": self.limit,
            "over": self.count > self.limit,
            "reset_seconds": max(0, round(self.reset_at - now)),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object], now: float) -> HotKey:
        """The inverse of ``as_dict`` (a worker's report, read by the primary)."""
        descriptor = data["descriptor"]
        assert isinstance(descriptor, list)
        return cls(
            key=str(data["key"]),
            domain=str(data["domain"]),
            entries=tuple((str(e["key"]), str(e["value"])) for e in descriptor),
            stats_key=str(data["rule"]),
            count=int(str(data["count"])),
            limit=int(str(data["limit"])),
            reset_at=int(now) + int(str(data["reset_seconds"])),
        )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class HotKeys:
    """The hottest counters: at most ``2 * capacity`` held, ``top`` gives up to ``capacity``."""

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, max_value_chars: int = DEFAULT_MAX_VALUE_CHARS
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.max_value_chars = max_value_chars
        self._keys: dict[str, HotKey] = {}

    def record(
        self,
        key: str,
        domain: str,
        entries: Sequence[Entry],
        stats_key: str,
        count: int,
        limit: int,
        reset_at: int,
        now: int,
    ) -> None:
        """``key``'s counter is at ``count`` at ``now`` (past the near-limit threshold)."""
        held = self._keys.get(key)
        if held is not None:
            if count > held.count:
                held.count = count
            return
        keys = self._keys
        if len(keys) >= 2 * self.capacity:
            self._trim(now)
        cut = self.max_value_chars
        keys[key] = HotKey(
            _cut(key, 4 * cut),
            _cut(domain, cut),
            tuple((_cut(k, cut), _cut(v, cut)) for k, v in entries[:16]),
            _cut(stats_key, 4 * cut),
            count,
            limit,
            reset_at,
        )

    def _trim(self, now: float) -> None:
        """Keep the ``capacity`` hottest counters whose window has not ended."""
        live = [k for k in self._keys.values() if k.reset_at > now]
        live.sort(key=lambda k: k.ratio, reverse=True)
        self._keys = {k.key: k for k in live[: self.capacity]}

    def top(self, now: float, limit: int | None = None) -> list[HotKey]:
        """Counters whose window is still running, over their limit first, then nearest to it."""
        self._trim(now)
        return list(self._keys.values())[: limit or self.capacity]

    def merge(self, others: Sequence[HotKey], now: int) -> None:
        """Add another process's hot keys (its count wins where it is higher)."""
        for other in others:
            self.record(
                other.key, other.domain, other.entries, other.stats_key, other.count,
                other.limit, other.reset_at, now,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self._keys)
