"""Counters in Redis (BACKEND_TYPE=redis): ``open_store`` picks the store for REDIS_TYPE
(single, sentinel, cluster) and, with REDIS_PERSECOND, wraps it for SECOND-unit counters; startup
retries PING with exponential backoff. See docs/backends.md."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ratelimit_svc.backends.redis.connection import CommandStore
from ratelimit_svc.errors import BackendError

if TYPE_CHECKING:
    from ratelimit_svc.limiter.store import CounterStore, StatsScope
    from ratelimit_svc.settings.model import RedisSettings, Settings

log = logging.getLogger(__name__)


def create_redis_store(cfg: RedisSettings, *, op_timeout: float) -> CommandStore:
    """The store for ``cfg.type`` (single, sentinel or cluster); no I/O yet."""
    if cfg.type == "single":
        from ratelimit_svc.backends.redis.single import RedisStore

        return RedisStore(cfg, op_timeout=op_timeout)
    if cfg.type == "sentinel":
        from ratelimit_svc.backends.redis.sentinel import SentinelStore

        return SentinelStore(cfg, op_timeout=op_timeout)
    if cfg.type == "cluster":
        from ratelimit_svc.backends.redis.cluster import ClusterStore

        return ClusterStore(cfg, op_timeout=op_timeout)
    raise BackendError(f"redis: unknown REDIS_TYPE '{cfg.type}'")


async def open_redis_store(
    cfg: RedisSettings,
    *,
    op_timeout: float,
    startup_initial_interval: float,
    startup_max_interval: float,
    startup_max_elapsed: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> CommandStore:
    """A store for ``cfg`` (any REDIS_TYPE) whose backend has answered PING.

    Failed attempts are retried after ``startup_initial_interval``, doubling up to
    ``startup_max_interval``; after ``startup_max_elapsed`` seconds (0 = never) the last error is
    raised as BackendError. Elapsed time counts both the sleeps and the attempts, so an injected
    ``sleep`` makes the schedule exact in tests.
    """
    if startup_initial_interval <= 0:
        raise ValueError("startup_initial_interval must be positive")
    store = create_redis_store(cfg, op_timeout=op_timeout)
    started = time.monotonic()
    slept = 0.0
    interval = startup_initial_interval
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                await store.ping()
            except BackendError as exc:
                elapsed = max(time.monotonic() - started, slept)
                remaining = startup_max_elapsed - elapsed
                if startup_max_elapsed > 0 and remaining <= 0:
                    raise BackendError(
                        f"{exc} (gave up after {attempt} attempts in {elapsed:.3g}s)"
                    ) from None
                delay = min(interval, remaining) if startup_max_elapsed > 0 else interval
                limit = (
                    f"giving up {remaining:.3g}s from now"
                    if startup_max_elapsed > 0
                    else "no time limit: REDIS_STARTUP_MAX_ELAPSED_TIME sets one"
                )
                log.warning(
                    "redis not ready (attempt %d): %s; waiting for %s to answer PING before "
                    "serving, next try in %.3gs (%s)",
                    attempt, exc, store.address, delay, limit,
                )  # fmt: skip
                await sleep(delay)
                slept += delay
                interval = min(interval * 2, startup_max_interval)
            else:
                if attempt > 1:
                    log.info("redis %s ready after %d attempts", store.address, attempt)
                return store
    except BaseException:
        await store.close()
        raise


async def open_store(
    settings: Settings, clock: Callable[[], float], scope: StatsScope
) -> CounterStore:
    """The backend factory: REDIS_* (and with REDIS_PERSECOND=true, REDIS_PERSECOND_* for
    SECOND-unit counters), REDIS_OP_TIMEOUT and the startup backoff. Connection counts go to
    ``redis_pool`` and ``redis_per_second_pool`` under ``scope``, as the reference's."""

    async def open_one(cfg: RedisSettings, pool_scope: str) -> CounterStore:
        store = await open_redis_store(
            cfg,
            op_timeout=settings.redis_op_timeout,
            startup_initial_interval=settings.redis_startup_initial_interval,
            startup_max_interval=settings.redis_startup_max_interval,
            startup_max_elapsed=settings.redis_startup_max_elapsed_time,
        )
        report_pool(store, scope.scope(pool_scope))
        return store

    main = await open_one(settings.redis, "redis_pool")
    if not settings.redis_persecond:
        return main
    from ratelimit_svc.backends.persecond import PerSecondStore

    try:
        per_second = await open_one(settings.redis_persecond_settings, "redis_per_second_pool")
    except BaseException:
        await main.close()
        raise
    return PerSecondStore(main, per_second)


def report_pool(store: CommandStore, scope: StatsScope) -> None:
    """``<scope>.cx_active`` (gauge), ``cx_total`` and ``cx_local_close`` (counters)."""
    scope.gauge("cx_active", lambda: store.pool_stats().get("cx_active", 0))
    scope.counter("cx_total", lambda: store.pool_stats().get("cx_total", 0))
    scope.counter("cx_local_close", lambda: store.pool_stats().get("cx_local_close", 0))
