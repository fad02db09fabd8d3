"""Counter stores behind the limiter's ``CounterStore`` seam, chosen from one explicit table.

Optional backends are imported lazily so that a deployment only needs the client libraries of the
backend it uses. Every store reached over the network is wrapped in a ``CircuitBreakerStore``
(BREAKER_FAILURE_THRESHOLD, BREAKER_COOLDOWN, BACKEND_MAX_IN_FLIGHT), so a failing or hung backend
makes requests fail fast instead of piling up.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import SettingsError

if TYPE_CHECKING:
    from ..limiter import CounterStore
    from ..settings import Settings

# BACKEND_TYPE → (module, factory). A factory is ``async def open_store(settings, clock)``.
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("ratelimit_svc.backends.memory", "open_store"),
    "redis": ("ratelimit_svc.backends.redis", "open_store"),
    "memcache": ("ratelimit_svc.backends.memcache", "open_store"),
}
# Stores that live in the process: they cannot hang or fail, so they get no breaker.
IN_PROCESS = frozenset({"memory"})


async def open_store(settings: Settings, clock: Callable[[], float]) -> CounterStore:
    """Open the store that BACKEND_TYPE names (retrying its startup as the backend defines)."""
    try:
        module_name, factory_name = BACKENDS[settings.backend_type]
    except KeyError:
        raise SettingsError(
            f"invalid value for BACKEND_TYPE: {settings.backend_type!r} "
            f"(supported: {', '.join(sorted(BACKENDS))})"
        ) from None
    factory: Callable[..., Awaitable[Any]] = getattr(
        importlib.import_module(module_name), factory_name
    )
    store: CounterStore = await factory(settings, clock)
    if settings.backend_type in IN_PROCESS:
        return store
    from .breaker import CircuitBreakerStore

    return CircuitBreakerStore(
        store,
        failure_threshold=settings.breaker_failure_threshold,
        cooldown=settings.breaker_cooldown,
        max_in_flight=settings.backend_max_in_flight,
    )
