"""Counter stores behind the limiter's ``CounterStore`` seam, chosen by BACKEND_TYPE in a ``match``.

Optional backends are imported lazily so that a deployment only needs the client libraries of the
backend it uses. Every store reached over the network is wrapped in a ``CircuitBreakerStore``
(BREAKER_FAILURE_THRESHOLD, BREAKER_COOLDOWN, BACKEND_MAX_IN_FLIGHT), so a failing or hung backend
makes requests fail fast instead of piling up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ratelimit_svc.errors import SettingsError

if TYPE_CHECKING:
    from ratelimit_svc.limiter.store import CounterStore, StatsScope
    from ratelimit_svc.settings.model import Settings

BACKEND_TYPES = ("memory", "redis", "memcache")


async def open_store(
    settings: Settings, clock: Callable[[], float], scope: StatsScope
) -> CounterStore:
    """Open the store that BACKEND_TYPE names (retrying its startup as the backend defines).
    Each backend's module is imported only when chosen; each store and wrapper reports its own
    numbers into ``scope`` (``ratelimit``), so nothing needs to reach through a wrapper."""
    store: CounterStore
    match settings.backend_type:
        case "memory":  # lives in the process: it cannot hang or fail, so it gets no breaker
            from ratelimit_svc.backends import memory

            return await memory.open_store(settings, clock)
        case "redis":
            from ratelimit_svc.backends import redis

            store = await redis.open_store(settings, clock, scope)
        case "memcache":
            from ratelimit_svc.backends.memcache import store as memcache

            store = await memcache.open_store(settings, clock)
        case other:
            raise SettingsError(
                f"invalid value for BACKEND_TYPE: {other!r} "
                f"(supported: {', '.join(sorted(BACKEND_TYPES))})"
            )
    from ratelimit_svc.backends.breaker import CircuitBreakerStore

    return CircuitBreakerStore(
        store,
        failure_threshold=settings.breaker_failure_threshold,
        cooldown=settings.breaker_cooldown,
        max_in_flight=settings.backend_max_in_flight,
        scope=scope.scope("backend_breaker"),
    )
