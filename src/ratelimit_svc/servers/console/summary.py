"""One process's backend line on the console (docs/console.md): health, breaker, latency and
errors, pool use. Apart from the console's model so a gRPC worker, which reports it to the
primary, imports neither the model nor what the model needs (docs/performance.md (Memory)).
"""

from __future__ import annotations

import os
from typing import Any

from ratelimit_svc.backends.latency import LatencyRecorder
from ratelimit_svc.limiter.store import CounterStore
from ratelimit_svc.servers.health import Health


def process_summary(
    store: CounterStore | None, recorder: LatencyRecorder | None, health: Health
) -> dict[str, Any]:
    """One process's backend line: health, breaker, latency and errors, pool use."""
    breaker = None
    if store is not None and hasattr(store, "breaker_stats"):
        state = getattr(store, "state", None)
        breaker = {
            "state": getattr(state, "value", "closed"),
            "max_in_flight": getattr(store, "max_in_flight", 0),
            **store.breaker_stats(),
        }
    inner: Any = getattr(store, "inner", store)  # the breaker's inner store has the connections
    pool = inner.pool_stats() if hasattr(inner, "pool_stats") else {}
    return {
        "pid": os.getpid(),
        "backend_reachable": health.backend_reachable,
        "healthy": health.healthy,
        "breaker": breaker,
        "operations": recorder.summary() if recorder is not None else None,
        "pool": pool or None,
    }
