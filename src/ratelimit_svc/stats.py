"""Stats: the service's counters, kept in memory under the reference's statsd names (SPEC 9).

``MemoryStats`` is the one small interface the rest of the service writes to (``add``,
``add_rule``, ``set_gauge``, ``observe_ms``) and the sinks read from (``snapshot``). Names are sanitized like the
reference's (``:`` and ``|`` become ``_``) so they are valid statsd names.
"""

from __future__ import annotations

from dataclasses import fields

from .limiter import RuleCounts

RULE_STATS = tuple(f.name for f in fields(RuleCounts))
_SANITIZE = str.maketrans({":": "_", "|": "_"})


def sanitize(name: str) -> str:
    return name.translate(_SANITIZE)


class MemoryStats:
    """Monotonic counters and last-value gauges by name."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, int] = {}
        self.timers: dict[str, list[float]] = {}  # name → [count, total milliseconds]

    def add(self, name: str, value: int = 1) -> None:
        name = sanitize(name)
        self.counters[name] = self.counters.get(name, 0) + value

    def add_rule(self, stats_key: str, counts: RuleCounts) -> None:
        prefix = sanitize(f"ratelimit.service.rate_limit.{stats_key}.")
        counters = self.counters
        for stat in RULE_STATS:
            name = prefix + stat
            counters[name] = counters.get(name, 0) + getattr(counts, stat)

    def set_gauge(self, name: str, value: int) -> None:
        self.gauges[sanitize(name)] = value

    def observe_ms(self, name: str, milliseconds: float) -> None:
        timer = self.timers.setdefault(name, [0, 0.0])
        timer[0] += 1
        timer[1] += milliseconds

    def get(self, name: str) -> int:
        return self.counters.get(name, self.gauges.get(name, 0))

    def snapshot(self) -> dict[str, int]:
        return {**self.counters, **self.gauges}
