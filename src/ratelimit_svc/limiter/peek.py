"""Looking at counters without counting (docs/observability.md (Peeking at a counter)): for each
descriptor of a request, the rule it matches, the backend key of its current window, the hits
counted so far, and when the window resets — read with the store's ``get``, so nothing is added
and no expiry is touched. The debug port's ``/debug/peek`` serves it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratelimit_svc.config.rules import RateLimitConfig, Rule
from ratelimit_svc.errors import NoConfigError, RequestError
from ratelimit_svc.limiter.limiter import Limiter, Request
from ratelimit_svc.limiter.matching import Entry, match


@dataclass(frozen=True, slots=True)
class CounterView:
    """One descriptor's counter. ``rule`` None: no rule matches (the descriptor is not limited)."""

    entries: tuple[Entry, ...]
    rule: Rule | None = None
    key: str = ""  # the backend key of the current window
    value: int = 0  # hits counted in the current window
    reset_seconds: int = 0
    cached_over: bool = False  # the local cache answers OVER_LIMIT for it without the backend

    @property
    def remaining(self) -> int:
        if self.rule is None or self.rule.unlimited:
            return 0
        return max(self.rule.requests_per_unit - self.value, 0)

    def as_dict(self) -> dict[str, object]:
        rule = self.rule
        return {
            "entries": [{"key": k, "value": v} for k, v in self.entries],
            "limited": rule is not None and not rule.unlimited,
            "rule": None if rule is None else {
                "name": rule.name,
                "requests_per_unit": rule.requests_per_unit,
                "unit": rule.unit.name,
                "unlimited": rule.unlimited,
                "shadow_mode": rule.shadow_mode,
            },
            "key": self.key,
            "value": self.value,
            "remaining": self.remaining,
            "reset_seconds": self.reset_seconds,
            "over_limit": rule is not None and not rule.unlimited and (
                self.cached_over or self.value > rule.requests_per_unit
            ),
            "cached_over_limit": self.cached_over,
        }  # fmt: skip


async def peek(
    limiter: Limiter, config: RateLimitConfig | None, request: Request
) -> list[CounterView]:
    """The counters ``request``'s descriptors map to now, in one ``get`` round trip."""
    if config is None:
        raise NoConfigError()
    if not request.domain:
        raise RequestError("rate limit domain must not be empty")
    now = int(limiter.clock())
    views: list[CounterView] = []
    counted: list[int] = []
    for descriptor in request.descriptors:
        found = None
        if request.domain in config.domains:
            found = match(config, request.domain, descriptor.entries, descriptor.override)
        if found is None or found.rule.unlimited:
            views.append(CounterView(descriptor.entries, None if found is None else found.rule))
            continue
        window = found.rule.unit.seconds
        into = now % window
        key = f"{limiter.options.cache_key_prefix}{found.key_body}{now - into}"
        cache = limiter.local_cache
        cached = cache is not None and cache.contains(key, now)
        counted.append(len(views))
        views.append(CounterView(descriptor.entries, found.rule, key, 0, window - into, cached))
    if counted:
        values = await limiter.store.get([views[i].key for i in counted])
        for index, value in zip(counted, values, strict=True):
            view = views[index]
            views[index] = CounterView(
                view.entries, view.rule, view.key, value, view.reset_seconds, view.cached_over
            )
    return views


def _shown(text: str) -> str:
    """Request text as one safe line: control characters and non-ASCII escaped."""
    return text.encode("unicode_escape").decode("ascii")


def format_text(domain: str, views: list[CounterView]) -> str:
    """The plain-text page: one block per descriptor (request values escaped)."""
    lines = [f"domain: {_shown(domain)}"]
    for view in views:
        entries = ",".join(f"{_shown(k)}={_shown(v)}" for k, v in view.entries)
        rule = view.rule
        if rule is None:
            lines.append(f"{entries}: no rule matches (not limited)")
        elif rule.unlimited:
            lines.append(f"{entries}: unlimited")
        else:
            over = " OVER LIMIT" if view.as_dict()["over_limit"] else ""
            lines.append(
                f"{entries}: {view.value}/{rule.requests_per_unit} per {rule.unit.name.lower()}"
                f", {view.remaining} remaining, resets in {view.reset_seconds}s{over}"
                f"\n    key: {_shown(view.key)}"
                + ("\n    the local cache holds it over its limit" if view.cached_over else "")
            )
    return "\n".join(lines) + "\n"
