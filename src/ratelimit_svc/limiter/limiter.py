"""Rate-limit decisions over a counter store: matching, counter keys, the local over-limit cache,
the per-descriptor decision (``windows.decide``), the overall code, response headers and dynamic
metadata, once for every backend, without protobuf (docs/configuration.md (How a request is
answered)). Rules that use the algorithms of docs/algorithms.md become store steps
(``limiter.stepped``) settled in one call beside the plain ones.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ratelimit_svc.config.rules import Algorithm, RateLimitConfig, Rule, Unit
from ratelimit_svc.errors import NoConfigError, RequestError
from ratelimit_svc.limiter.algorithms import US
from ratelimit_svc.limiter.hotkeys import HotKeys
from ratelimit_svc.limiter.localcache import LocalCache
from ratelimit_svc.limiter.matching import Entry, Match, Override, match
from ratelimit_svc.limiter.stepped import Stepped, judge, limit_key, make_step
from ratelimit_svc.limiter.store import CounterStore, Increment
from ratelimit_svc.limiter.tuples import builder
from ratelimit_svc.limiter.windows import Code, RuleCounts, decide, near_threshold

__all__ = [
    "MAX_UINT32",
    "Code",
    "Decision",
    "Limiter",
    "LimiterOptions",
    "Request",
    "RequestDescriptor",
    "RuleCounts",
    "StatsRecorder",
    "Status",
    "decide",
    "near_threshold",
]

MAX_UINT32 = 2**32 - 1
# Expiration jitter: a uniform whole number in [0, n), half the cost of random.randrange(n).
_random = random.random



# The request and the decision are named tuples, not frozen dataclasses: immutable all the same,
# and one is built per descriptor of every request at a quarter of the cost
# (docs/performance.md (What the hot path avoids)).


class RequestDescriptor(NamedTuple):
    entries: tuple[Entry, ...]
    override: Override | None = None
    hits_addend: int | None = None  # None: the wrapper was absent


class Request(NamedTuple):
    domain: str
    descriptors: tuple[RequestDescriptor, ...]
    hits_addend: int = 0


class Status(NamedTuple):
    """One DescriptorStatus. ``rule`` is the current limit (None: no limit applied)."""

    code: Code
    rule: Rule | None = None
    remaining: int = 0
    reset_seconds: int = 0


class Decision(NamedTuple):
    overall: Code
    statuses: tuple[Status, ...]
    headers: tuple[tuple[str, str], ...] = ()
    dynamic_metadata: dict[str, Any] | None = None


class StatsRecorder(Protocol):
    """Where the limiter reports what it counted (``stats`` implements it)."""

    def add(self, name: str, value: int = 1) -> None: ...

    def add_rule(self, stats_key: str, counts: RuleCounts) -> None: ...

    def add_within(self, stats_key: str, hits: int) -> None:
        """``add_rule`` of a decision within the limit and below its near-limit threshold:
        ``hits`` to total_hits and within_limit."""
        ...


@dataclass(frozen=True, slots=True)
class LimiterOptions:
    near_limit_ratio: float = 0.8
    expiration_jitter_max_seconds: int = 300
    cache_key_prefix: str = ""
    local_cache_size_in_bytes: int = 0
    stop_cache_key_increment_when_overlimit: bool = False
    shadow_mode: bool = False
    quota_mode: bool = False
    response_headers: tuple[str, str, str] | None = None  # (limit, remaining, reset) names
    dynamic_metadata: bool = False
    charge_only_when_admitted: bool = False  # every rule (docs/algorithms.md)
    ietf_headers: bool = False  # RateLimit and RateLimit-Policy (docs/algorithms.md)


# A descriptor whose rule is counted in this request, as a plain tuple (one is built per counted
# descriptor of every request): (index, rule, stats key, hits, counter key, window, seconds to
# the window's end, quota).
_Counted = tuple[int, Rule, str, int, str, int, int, bool]


_status = builder(Status)
_increment = builder(Increment)
# Window lengths by unit (Unit.seconds is a property: a call per descriptor).
_SECONDS = {unit: unit.seconds for unit in Unit}
_OK = Status(Code.OK)
_UNLIMITED = Status(Code.OK, remaining=MAX_UINT32)
_NEAR_CACHE_MAX = 4096  # distinct limits remembered (overrides from requests can be any value)


@dataclass
class Limiter:
    """Answers ShouldRateLimit for a config snapshot, counting in ``store``."""

    store: CounterStore
    stats: StatsRecorder
    options: LimiterOptions = field(default_factory=LimiterOptions)
    clock: Callable[[], float] = time.time
    jitter: Callable[[int], int] = field(default=lambda n: int(_random() * n))
    local_cache: LocalCache | None = None
    # Told of every fixed-window counter past its near-limit threshold (the console's hot keys).
    hot_keys: HotKeys | None = None
    # limit -> near-limit threshold for options.near_limit_ratio (a float32 product: worth keeping)
    _near: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.local_cache is None and self.options.local_cache_size_in_bytes > 0:
            self.local_cache = LocalCache(self.options.local_cache_size_in_bytes)

    async def should_rate_limit(
        self, config: RateLimitConfig | None, request: Request
    ) -> Decision:
        domain, descriptors, request_hits = request
        if not domain:
            raise RequestError("rate limit domain must not be empty")
        if not descriptors:
            raise RequestError("rate limit descriptor list must not be empty")
        if config is None:
            raise NoConfigError()

        options = self.options
        clock_now = self.clock()
        now = int(clock_now)
        matches = self._match_all(config, request)
        statuses: list[Status] = [_OK] * len(descriptors)
        counted: list[_Counted] = []
        stepped: list[tuple[int, Match, int]] | None = None
        prefix = options.cache_key_prefix
        default_hits = request_hits if request_hits > 1 else 1
        quota_mode = options.quota_mode
        all_stepped = options.charge_only_when_admitted
        for index, found in enumerate(matches):
            if found is None:
                continue
            rule = found.rule
            if rule.unlimited:
                statuses[index] = _UNLIMITED
                continue
            hits = descriptors[index].hits_addend
            if hits is None:
                hits = default_hits
            if all_stepped or not rule.classic:
                if stepped is None:
                    stepped = []
                stepped.append((index, found, hits))
                continue
            window = _SECONDS[rule.unit]
            into = now % window
            key = f"{prefix}{found.key_body}{now - into}"
            quota = quota_mode or rule.quota_mode
            counted.append((index, rule, found.stats_key, hits, key, window, window - into, quota))

        items: list[Stepped] = []
        afters: list[int] = []
        cached: list[bool] | None = None
        if stepped is not None:
            items = self._steps(stepped, counted, now, clock_now)
            afters, cached = await self._settle(items, counted, now, int(clock_now * US))
        elif self.local_cache is None and not options.stop_cache_key_increment_when_overlimit:
            if counted:  # the usual request: only increments (no coroutine of _count's)
                increments = self._increments(counted, [item[3] for item in counted])
                afters = _one_each(await self.store.increment(increments), counted)
        elif counted:
            afters, cached = await self._count(counted, now)

        stats = self.stats
        cache = self.local_cache
        hot = self.hot_keys
        nears = self._near
        over = False
        for position, (index, rule, stats_key, hits, key, _, reset, _) in enumerate(counted):
            after = afters[position]
            limit = rule.requests_per_unit
            near = nears.get(limit)
            if near is None:
                near = self._near_threshold(limit)
            is_cached = cached is not None and cached[position]
            if after <= near and after <= limit and not is_cached:
                # The usual answer, below the near-limit threshold: ``decide``'s within-limit
                # case without building its stat deltas.
                stats.add_within(stats_key, hits)
                statuses[index] = _status((Code.OK, rule, limit - after, reset))
                continue
            code, remaining, counts = decide(
                limit, hits, after, near, shadow=rule.shadow_mode, cached=is_cached
            )
            stats.add_rule(stats_key, counts)
            if cache is not None and not is_cached and after > limit:
                cache.add(key, now + reset)  # shadow-mode rules are cached too
            if hot is not None and after > near:
                hot.record(
                    key, domain, descriptors[index].entries, stats_key, after, limit,
                    now + reset, now,
                )  # fmt: skip
            if code is Code.OVER_LIMIT:
                over = True
            statuses[index] = _status((code, rule, remaining, reset))

        judged = self._judge_steps(items, statuses, int(clock_now * US)) if items else []
        headers: tuple[tuple[str, str], ...] = ()
        if over or judged or options.response_headers or options.ietf_headers:
            quotas = {item[0]: item[7] for item in counted}
            for judge in judged:
                quotas[judge.index] = judge.quota
            overall = self._overall(statuses, quotas)
            if options.response_headers or options.ietf_headers:
                headers = self._headers(statuses, quotas)
        else:  # no status is over its limit: nor is the request, quota or not
            overall = Code.OK
        if overall is Code.OVER_LIMIT and options.shadow_mode:
            self.stats.add("ratelimit.service.global_shadow_mode")
            overall = Code.OK
        metadata = (
            self._dynamic_metadata(request, statuses, matches) if options.dynamic_metadata else None
        )
        return Decision(overall, tuple(statuses), headers, metadata)

    async def dry_run(
        self, config: RateLimitConfig | None, request: Request
    ) -> tuple[Decision, list[Match | None], list[int | None]]:
        """What ``should_rate_limit`` would answer with every hits_addend 0, changing nothing:
        counters are only read, no stat is counted, the local cache is only consulted. Also the
        match of each descriptor and its counter's current value (None: not read). Only plain
        fixed-window rules are read; a descriptor whose rule counts otherwise
        (docs/algorithms.md) gets Code.UNKNOWN and takes no part in the overall code."""
        if not request.domain:
            raise RequestError("rate limit domain must not be empty")
        if not request.descriptors:
            raise RequestError("rate limit descriptor list must not be empty")
        if config is None:
            raise NoConfigError()
        count = len(request.descriptors)
        now = int(self.clock())
        known = request.domain in config.domains  # _match_all counts an unknown domain
        matches: list[Match | None] = [None] * count
        if known:
            matches = self._match_all(config, request)
        statuses: list[Status] = [_OK] * count
        counted: list[_Counted] = []
        prefix = self.options.cache_key_prefix
        for index, found in enumerate(matches):
            if found is None:
                continue
            rule = found.rule
            if rule.unlimited:
                statuses[index] = _UNLIMITED
            elif not rule.classic or self.options.charge_only_when_admitted:
                statuses[index] = Status(Code.UNKNOWN, rule)
            else:
                window = rule.unit.seconds
                into = now % window
                key = f"{prefix}{found.key_body}{now - into}"
                quota = rule.quota_mode or self.options.quota_mode
                counted.append(
                    (index, rule, found.stats_key, 0, key, window, window - into, quota)
                )
        current: list[int | None] = [None] * count
        if counted:
            values = await self.store.get([item[4] for item in counted])
            cache = self.local_cache
            for (index, rule, _, _, key, _, reset, _), value in zip(counted, values, strict=True):
                current[index] = value
                limit = rule.requests_per_unit
                code, remaining, _ = decide(
                    limit, 0, value, self._near_threshold(limit), shadow=rule.shadow_mode,
                    cached=cache is not None and cache.holds(key, now),
                )  # fmt: skip
                statuses[index] = Status(code, rule, remaining, reset)
        overall = self._overall(statuses, {item[0]: item[7] for item in counted})
        if overall is Code.OVER_LIMIT and self.options.shadow_mode:
            overall = Code.OK
        return Decision(overall, tuple(statuses)), matches, current

    def _near_threshold(self, limit: int) -> int:
        near = self._near.get(limit)
        if near is None:
            if len(self._near) >= _NEAR_CACHE_MAX:
                self._near.clear()
            near = self._near[limit] = near_threshold(limit, self.options.near_limit_ratio)
        return near

    def _match_all(self, config: RateLimitConfig, request: Request) -> list[Match | None]:
        domain = request.domain
        if domain not in config.domains:
            name = f"ratelimit.service.rate_limit.{domain}.domain_not_found"
            for _ in request.descriptors:
                self.stats.add(name)
            return [None] * len(request.descriptors)
        matches: list[Match | None] = []
        replaced = False
        for descriptor in request.descriptors:
            override = descriptor.override
            if override is not None and override.unit is Unit.UNKNOWN:
                raise RequestError(
                    "rate limit override has an unknown unit "
                    f"(descriptor {len(matches)}: {list(descriptor.entries)})"
                )
            found = match(config, domain, descriptor.entries, override)
            if found is not None and found.rule.replaces:
                replaced = True
            matches.append(found)
        if replaced:
            names = {name for m in matches if m is not None for name in m.rule.replaces}
            # An unlimited rule is never replaced, as in the reference (docs/compatibility.md).
            matches = [
                None
                if m is not None and m.rule.name and not m.rule.unlimited and m.rule.name in names
                else m
                for m in matches
            ]
        return matches

    async def _count(
        self, counted: list[_Counted], now: int
    ) -> tuple[list[int], list[bool] | None]:
        """Each counted descriptor's counter after this request (0 where the local cache answered),
        and which ones the local cache answered (None: no local cache).

        With STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, as in the reference (docs/compatibility.md):
        when any key is over via the local cache, or when some keys would go over and others not,
        the keys not incremented still get an increment of 0, so their count is the current one
        and their (zero-valued) keys exist in the store exactly as the reference writes them.
        """
        cache = self.local_cache
        cached: list[bool] | None = None
        pending = counted
        if cache is not None:
            cached = [cache.contains(item[4], now) for item in counted]
            if True in cached:
                pending = [item for item, hit in zip(counted, cached, strict=True) if not hit]
                if not pending:
                    return [0] * len(counted), cached
        hits = [item[3] for item in pending]
        if self.options.stop_cache_key_increment_when_overlimit:
            if len(pending) < len(counted):
                hits = [0] * len(pending)  # some key is over via the local cache
            else:
                current = await self.store.get([item[4] for item in pending])
                would_pass = [
                    value + item[3] > item[1].requests_per_unit
                    for item, value in zip(pending, current, strict=True)
                ]
                if any(would_pass):
                    hits = [n if over else 0 for n, over in zip(hits, would_pass, strict=True)]
        values = _one_each(await self.store.increment(self._increments(pending, hits)), pending)
        if pending is counted:
            return values, cached
        answered = iter(values)
        return [0 if hit else next(answered) for hit in cached or ()], cached

    def _increments(self, counted: list[_Counted], hits: list[int]) -> list[Increment]:
        """``hits`` to each counted descriptor's key, its TTL with the expiration jitter."""
        jitter_max = self.options.expiration_jitter_max_seconds
        if jitter_max > 0:
            jitter = self.jitter
            return [
                _increment((item[4], n, item[5], item[5] + jitter(jitter_max)))
                for item, n in zip(counted, hits, strict=True)
            ]
        pairs = zip(counted, hits, strict=True)
        return [_increment((item[4], n, item[5], item[5])) for item, n in pairs]

    def _steps(
        self,
        stepped: list[tuple[int, Match, int]],
        counted: list[_Counted],
        now: int,
        clock_now: float,
    ) -> list[Stepped]:
        """Store steps for the rules of docs/algorithms.md. When any of them is charged only if
        the request is admitted, the request's plain fixed windows join the same batch, so that
        one atomic operation sees every verdict."""
        options = self.options
        now_us = int(clock_now * US)
        conditional_all = options.charge_only_when_admitted
        together = conditional_all or any(m.rule.charge_only_when_admitted for _, m, _ in stepped)
        jitter_max = options.expiration_jitter_max_seconds
        prefix = options.cache_key_prefix
        binding = not options.shadow_mode
        jitter = self.jitter
        items: list[Stepped] = []
        # (index, limit, stats key, key, hits, quota, conditional) of every limit
        limits: list[tuple[int, Rule, str, str, int, bool, bool]] = []
        if together:
            limits = [
                (index, rule, stats_key, key, hits, quota, conditional_all)
                for index, rule, stats_key, hits, key, _, _, quota in counted
            ]
            counted.clear()
        for index, found, hits in stepped:
            rule = found.rule
            conditional = conditional_all or rule.charge_only_when_admitted
            quota = rule.quota_mode or options.quota_mode
            for limit in (rule, *rule.more) if rule.more else (rule,):
                key = limit_key(prefix, found.key_body, limit, now)
                stats_key = found.stats_key + limit.stats_suffix
                limits.append((index, limit, stats_key, key, hits, quota, conditional))
        for index, limit, stats_key, key, hits, quota, conditional in limits:
            ttl = limit.window_seconds
            if jitter_max > 0 and limit.algorithm is Algorithm.FIXED_WINDOW:
                ttl += jitter(jitter_max)
            step = make_step(
                limit, key, hits, now_us, ttl, conditional=conditional,
                binding=binding and not limit.shadow_mode,
            )
            items.append(Stepped(index, limit, stats_key, quota, step))
        return items

    async def _settle(
        self, items: list[Stepped], counted: list[_Counted], now: int, now_us: int
    ) -> tuple[list[int], list[bool] | None]:
        """Settle ``items`` and count ``counted`` (``_count``'s answer) at once."""
        settling = self.store.settle([item.step for item in items], now_us)
        counts: tuple[list[int], list[bool] | None] = ([], None)
        if counted:  # plain fixed windows, on their own path (local cache, stop-cache option)
            # Its answer is a list, not the tuple typeshed says, and compiled code (setup.py)
            # checks the type of what it awaits: awaited as Any.
            gathering: Any = asyncio.gather(self._count(counted, now), settling)
            counts, results = await gathering
        else:
            results = await settling
        for item, result in zip(items, results, strict=True):
            item.result = result
        return counts

    def _judge_steps(
        self, items: list[Stepped], statuses: list[Status], now_us: int
    ) -> list[Stepped]:
        """Statuses and stats of stepped limits; one representative per descriptor: its first
        over-limit limit, else the one with the least remaining (docs/algorithms.md)."""
        add_rule = self.stats.add_rule
        chosen: dict[int, tuple[Status, Stepped]] = {}
        for item in items:
            limit = item.rule
            capacity, used, reset_us = judge(item, now_us)
            code, remaining, counts = decide(
                capacity, item.step.hits, used, self._near_threshold(capacity),
                shadow=limit.shadow_mode,
            )
            add_rule(item.stats_key, counts)
            status = Status(code, limit, remaining, -(-reset_us // US))
            best = chosen.get(item.index)
            if best is None or _more_restrictive(status, best[0]):
                chosen[item.index] = (status, item)
        if len(chosen) == len(items):  # one limit per descriptor: every item represents one
            for status, item in chosen.values():
                statuses[item.index] = status
            return items
        for index, (status, _) in chosen.items():
            statuses[index] = status
        return [item for _, item in chosen.values()]

    def _overall(self, statuses: list[Status], quota: dict[int, bool]) -> Code:
        """OVER_LIMIT iff a non-quota rule is over, or every quota descriptor is (``quota``: by
        the index of each counted descriptor, whether it counts in quota mode). Unlimited
        descriptors take no part; under QUOTA_MODE a descriptor without a rule is a passing quota
        descriptor (docs/compatibility.md)."""
        global_quota = self.options.quota_mode
        quota_total = quota_over = 0
        for index, status in enumerate(statuses):
            if status is _UNLIMITED:
                continue
            is_quota = quota.get(index, global_quota)
            if status.code is Code.OVER_LIMIT:
                if not is_quota:
                    return Code.OVER_LIMIT
                quota_over += 1
            if is_quota:
                quota_total += 1
        if quota_total and quota_over == quota_total:
            return Code.OVER_LIMIT
        return Code.OK

    def _headers(
        self, statuses: list[Status], quotas: dict[int, bool]
    ) -> tuple[tuple[str, str], ...]:
        names = self.options.response_headers
        quota = {index for index, is_quota in quotas.items() if is_quota}
        chosen: Status | None = None
        for status in statuses:
            if status.rule is None:
                continue
            if chosen is None or status.remaining < chosen.remaining:
                chosen = status
        for index, status in enumerate(statuses):
            if status.code is Code.OVER_LIMIT and index not in quota:
                chosen = status
        if chosen is None or chosen.rule is None:
            return ()
        headers: tuple[tuple[str, str], ...] = ()
        if names is not None:
            limit_name, remaining_name, reset_name = names
            headers = (
                (limit_name, str(chosen.rule.requests_per_unit)),
                (remaining_name, str(chosen.remaining)),
                (reset_name, str(chosen.reset_seconds)),
            )
        if self.options.ietf_headers:
            headers += ietf_headers(chosen.rule, chosen.remaining, chosen.reset_seconds)
        return headers

    def _dynamic_metadata(
        self, request: Request, statuses: list[Status], matches: list[Match | None]
    ) -> dict[str, Any]:
        descriptors: list[dict[str, Any]] = []
        for descriptor in request.descriptors:
            entry: dict[str, Any] = {"entries": [f"{k}={v}" for k, v in descriptor.entries]}
            if descriptor.override is not None:
                entry["limit"] = {
                    "requestsPerUnit": descriptor.override.requests_per_unit,
                    "unit": descriptor.override.unit.name,
                }
            if descriptor.hits_addend is not None:
                entry["hitsAddend"] = descriptor.hits_addend
            descriptors.append(entry)
        result: dict[str, Any] = {"domain": request.domain, "descriptors": descriptors}
        if request.hits_addend:
            result["hitsAddend"] = request.hits_addend
        merged: dict[str, Any] = {}
        for found, status in zip(matches, statuses, strict=True):
            if found is None or found.rule.metadata is None:
                continue
            if status.code is Code.OVER_LIMIT:
                continue
            _merge_first_wins(merged, found.rule.metadata)
        if merged:
            result["metadata"] = merged
        return result


def _one_each(values: list[int], counted: list[_Counted]) -> list[int]:
    """``values`` if the store answered one count per key (else a bug: ValueError)."""
    if len(values) != len(counted):
        raise ValueError(f"the store answered {len(values)} counts for {len(counted)} keys")
    return values


def _more_restrictive(status: Status, than: Status) -> bool:
    if (status.code is Code.OVER_LIMIT) != (than.code is Code.OVER_LIMIT):
        return status.code is Code.OVER_LIMIT
    return status.code is not Code.OVER_LIMIT and status.remaining < than.remaining


def ietf_headers(rule: Rule, remaining: int, reset: int) -> tuple[tuple[str, str], ...]:
    """``RateLimit-Policy`` and ``RateLimit`` of the IETF RateLimit header fields draft for the
    limit that decided (docs/algorithms.md, "Response headers"). The policy is named after the
    rule's config path; a token bucket's quota is its burst, its window the time to refill it."""
    name = _sf_string(rule.stats_key + rule.stats_suffix)
    quota, window = rule.requests_per_unit, rule.window_seconds
    if rule.algorithm is Algorithm.TOKEN_BUCKET and quota:
        # A full bucket per the time it takes to refill: the burst, and the long-run rate.
        quota, window = rule.burst or quota, -(-(rule.burst or quota) * window // quota)
    return (
        ("RateLimit-Policy", f"{name};q={quota};w={window}"),
        ("RateLimit", f"{name};r={remaining};t={reset}"),
    )


def _sf_string(text: str) -> str:
    """A structured-field string (RFC 8941): printable ASCII, quote and backslash escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _merge_first_wins(into: dict[str, Any], new: Any) -> None:
    for key, value in new.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            merged = dict(into[key])
            _merge_first_wins(merged, value)
            into[key] = merged
