"""Live traffic for the console: per-domain and per-rule rates over the last minutes.

Every ``interval`` seconds ``TrafficHistory.sample`` reads the per-key stats the service already
keeps (``MemoryStats.key_totals``: requests, within/near/over limit, shadow), turns the growth
since the previous sample into rates and appends them to a ring of ``samples`` entries. Each entry
holds every domain but only the ``max_rules`` busiest rules of that interval, so memory is bounded
by ``samples * (domains + max_rules)`` whatever the number of keys (docs/console.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

# The per-rule stats drawn, in the order of the ``rates`` tuples.
SERIES = ("total_hits", "within_limit", "near_limit", "over_limit", "shadow_mode")
DEFAULT_INTERVAL = 2.0
DEFAULT_SAMPLES = 300  # ten minutes at the default interval
DEFAULT_MAX_RULES = 40
Rates = tuple[float, ...]


class KeyTotals(Protocol):
    def key_totals(self) -> Iterator[tuple[str, dict[str, int]]]: ...


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # epoch seconds
    domains: dict[str, Rates]
    rules: dict[str, Rates]


def domain_of(stats_key: str, domains: Iterable[str]) -> str:
    """The domain a stats key belongs to: the longest loaded domain it starts with (domains may
    contain dots), else its first dotted part."""
    best = ""
    for domain in domains:
        if len(domain) > len(best) and stats_key.startswith(domain + "."):
            best = domain
    return best or stats_key.split(".", 1)[0]


class TrafficHistory:
    """A ring of rate samples of the per-key stats in ``stats``."""

    def __init__(
        self,
        stats: KeyTotals,
        *,
        domains: Callable[[], Iterable[str]] = tuple,
        interval: float = DEFAULT_INTERVAL,
        samples: int = DEFAULT_SAMPLES,
        max_rules: int = DEFAULT_MAX_RULES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.domains = domains
        self.interval = interval
        self.max_rules = max_rules
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=samples)
        self._last: dict[str, tuple[int, ...]] = {}
        self._last_at: float | None = None

    def sample(self) -> Sample | None:
        """Take one sample (None the first time: there is nothing yet to take a rate against)."""
        now = self.clock()
        if self._last_at is not None and now <= self._last_at:
            return None  # no time has passed (a clock that only tests move)
        totals = {
            key: tuple(counts.get(stat, 0) for stat in SERIES)
            for key, counts in self.stats.key_totals()
        }
        last, last_at = self._last, self._last_at
        self._last, self._last_at = totals, now
        if last_at is None:
            return None
        elapsed = now - last_at
        known = list(self.domains())
        rules: dict[str, Rates] = {}
        domains: dict[str, list[float]] = {}
        for key, values in totals.items():
            before = last.get(key)
            # A key evicted and seen again starts from zero: its whole total is new.
            growth = values if before is None else tuple(
                max(0, v - b) for v, b in zip(values, before, strict=True)
            )
            if not any(growth):
                continue
            rates = tuple(round(g / elapsed, 3) for g in growth)
            rules[key] = rates
            summed = domains.setdefault(domain_of(key, known), [0.0] * len(SERIES))
            for index, rate in enumerate(rates):
                summed[index] += rate
        if len(rules) > self.max_rules:
            busiest = sorted(rules, key=lambda k: rules[k][0], reverse=True)[: self.max_rules]
            rules = {key: rules[key] for key in busiest}
        sample = Sample(
            now, {d: tuple(round(r, 3) for r in v) for d, v in domains.items()}, rules
        )
        self.samples.append(sample)
        return sample

    def as_json(self, *, max_rules: int = 20) -> dict[str, object]:
        """``times`` and, per domain and per rule (the ``max_rules`` busiest over the window), one
        list of rates per stat in ``series``, aligned with ``times`` (0 where a key had none)."""
        samples = list(self.samples)
        domain_names = sorted({d for s in samples for d in s.domains})
        volume: dict[str, float] = {}
        for s in samples:
            for key, rates in s.rules.items():
                volume[key] = volume.get(key, 0.0) + rates[0]
        rule_names = sorted(volume, key=lambda k: (-volume[k], k))[:max_rules]

        def columns(
            series: Callable[[Sample], dict[str, Rates]], name: str
        ) -> dict[str, list[float]]:
            picked = [series(s).get(name) for s in samples]
            return {
                stat: [0.0 if p is None else p[index] for p in picked]
                for index, stat in enumerate(SERIES)
            }

        def of_domains(s: Sample) -> dict[str, Rates]:
            return s.domains

        def of_rules(s: Sample) -> dict[str, Rates]:
            return s.rules

        return {
            "interval_seconds": self.interval,
            "window_seconds": round(self.interval * (self.samples.maxlen or 0)),
            "series": list(SERIES),
            "times": [round(s.at, 3) for s in samples],
            "domains": {d: columns(of_domains, d) for d in domain_names},
            "rules": [
                {
                    "rule": k,
                    "domain": domain_of(k, domain_names),
                    "rates": columns(of_rules, k),
                }
                for k in rule_names
            ],
        }
