"""Counters in memcached (BACKEND_TYPE=memcache): decisions from one multi-get, increments in the
background, exact within one process, expiries over 30 days sent as absolute times
(docs/backends.md (Memcached)).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from ratelimit_svc.backends.memcache.client import (
    Server,
    SrvResolver,
    check_srv_name,
    dns_srv_records,
    legal_key,
    pick,
    servers_from_srv,
    tls_context,
)
from ratelimit_svc.errors import BackendError, raise_unless_any_answered
from ratelimit_svc.limiter.algorithms import Step, StepResult
from ratelimit_svc.limiter.store import Increment

if TYPE_CHECKING:
    import ssl

    from ratelimit_svc.settings.model import MemcacheSettings, Settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MAX_RELATIVE_EXPIRY = 30 * 24 * 3600  # memcached reads larger expiries as a Unix time
SWEEP_INTERVAL_SECONDS = 1


def storage_key(key: str) -> bytes:
    """The key as memcached stores it: itself, or a digest where memcached cannot take it."""
    raw = key.encode()
    if legal_key(raw):
        return raw
    return b"ratelimit-sha256:" + hashlib.sha256(raw).hexdigest().encode()


class MemcacheStore:
    """Counters in memcached. Build with ``open_memcache_store`` (or call ``start``)."""

    def __init__(
        self,
        servers: Sequence[str] = (),
        *,
        op_timeout: float = 1.0,
        max_idle_conns: int = 2,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        wall_clock: Callable[[], float] = time.time,
        srv: str = "",
        srv_refresh: float = 0.0,
        resolver: SrvResolver = dns_srv_records,
    ) -> None:
        if bool(servers) == bool(srv):
            raise BackendError("memcache: set exactly one of MEMCACHE_HOST_PORT and MEMCACHE_SRV")
        if srv:
            check_srv_name(srv)
        self._op_timeout = op_timeout
        self._max_idle = max_idle_conns
        self._tls = tls
        self._clock = clock
        self._wall_clock = wall_clock
        self._srv = srv
        self._srv_refresh = srv_refresh
        self._resolver = resolver
        self._servers: list[Server] = [self._server(address) for address in servers]
        # Per counter: the highest value handed out, until the counter's expiry (clock seconds).
        self._seen: dict[bytes, list[int]] = {}
        self._expiry_buckets: dict[int, set[bytes]] = {}
        self._next_sweep = 0
        self._pending: dict[bytes, list[int]] = {}  # key → [hits, ttl] not yet sent
        self._flusher: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self.background_failures = 0

    def __repr__(self) -> str:
        source = f"srv {self._srv}" if self._srv else ",".join(self.servers)
        return f"MemcacheStore({source}, max_idle_conns={self._max_idle})"

    @property
    def servers(self) -> list[str]:
        """Server addresses in shard order."""
        return [server.address for server in self._servers]

    def server_for(self, key: str) -> str:
        """The address of the server that holds counter ``key``."""
        raw = storage_key(key)
        return self._servers[pick(raw, len(self._servers))].address

    async def start(self) -> None:
        """Resolve MEMCACHE_SRV (failure is a startup error, as in the reference) and start its
        periodic refresh."""
        if self._srv:
            await self.refresh_servers()
            if self._srv_refresh > 0:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    # -- the CounterStore contract -----------------------------------------------------------

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        keys = [storage_key(inc.key) for inc in increments]
        stored = await self._get_many(list(dict.fromkeys(keys)))
        # From here to the return nothing awaits: concurrent calls see each other's hits.
        now = int(self._clock())
        self._sweep(now)
        running: dict[bytes, int] = {}
        results: list[int] = []
        for key, inc in zip(keys, increments, strict=True):
            before = running.get(key)
            if before is None:
                seen = self._seen.get(key)
                before = max(stored.get(key, 0), seen[0] if seen is not None else 0)
            running[key] = after = before + inc.hits
            results.append(after)
            if inc.hits > 0:
                pending = self._pending.setdefault(key, [0, inc.ttl])
                pending[0] += inc.hits
                pending[1] = max(pending[1], inc.ttl)
                self._remember(key, after, now + inc.ttl)
        if self._pending and self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return results

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        # Rules that need it are refused when the config loads (docs/algorithms.md).
        raise BackendError(
            "memcache: only fixed windows without charge_only_when_admitted are supported "
            "(docs/algorithms.md)"
        )

    async def get(self, keys: Sequence[str]) -> list[int]:
        mapped = [storage_key(key) for key in keys]
        stored = await self._get_many(list(dict.fromkeys(mapped)))
        now = int(self._clock())
        self._sweep(now)
        results = []
        for key in mapped:
            seen = self._seen.get(key)
            results.append(max(stored.get(key, 0), seen[0] if seen is not None else 0))
        return results

    async def ping(self) -> None:
        """At least one server answers ``version`` (one dead server fails only its keys)."""
        servers = self._live_servers()
        deadline = asyncio.get_running_loop().time() + self._op_timeout
        outcomes = await asyncio.gather(
            *(self._bounded(server, server.version, deadline) for server in servers),
            return_exceptions=True,
        )
        raise_unless_any_answered(outcomes)

    async def close(self) -> None:
        """Stop refreshing, send the increments still queued, close every connection."""
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        while self._flusher is not None or self._pending:
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
            await self._flusher
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(server.close() for server in self._servers))

    # -- reads ------------------------------------------------------------------------------------

    async def _get_many(self, keys: list[bytes]) -> dict[bytes, int]:
        if not keys:
            return {}
        servers = self._live_servers()
        groups: dict[int, list[bytes]] = {}
        for key in keys:
            groups.setdefault(pick(key, len(servers)), []).append(key)
        deadline = asyncio.get_running_loop().time() + self._op_timeout
        outcomes = await asyncio.gather(
            *(
                self._bounded(servers[index], partial(servers[index].get_many, group), deadline)
                for index, group in groups.items()
            ),
            return_exceptions=True,
        )
        values: dict[bytes, int] = {}
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            for key, raw in outcome.items():
                if not raw.isdigit():
                    raise BackendError(
                        f"memcache: counter {key.decode(errors='replace')!r} holds {raw[:32]!r}, "
                        "not a number"
                    )
                values[key] = int(raw)
        return values

    async def _bounded(
        self, server: Server, call: Callable[[], Awaitable[_T]], deadline: float
    ) -> _T:
        """``call()`` under ``deadline``; a timeout names the server. (A callable, not a
        coroutine: one made but never awaited, if the caller is cancelled first, would warn.)"""
        try:
            async with asyncio.timeout_at(deadline):
                return await call()
        except TimeoutError:
            raise BackendError(
                f"memcache: no answer from {server.address} within {self._op_timeout:g}s"
            ) from None

    # -- the local view of counters ------------------------------------------------------------

    def _remember(self, key: bytes, value: int, expires_at: int) -> None:
        entry = self._seen.get(key)
        if entry is None:
            self._seen[key] = [value, expires_at]
        else:
            entry[0] = max(entry[0], value)
            if expires_at <= entry[1]:
                return
            entry[1] = expires_at
        self._expiry_buckets.setdefault(expires_at, set()).add(key)

    def _sweep(self, now: int) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_SECONDS
        for second in [s for s in self._expiry_buckets if s <= now]:
            for key in self._expiry_buckets.pop(second):
                entry = self._seen.get(key)
                if entry is not None and entry[1] <= now:
                    del self._seen[key]

    # -- background increments -----------------------------------------------------------------

    async def _flush(self) -> None:
        """Send the queued increments, batch after batch, until none are left."""
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    await self._apply(batch)
                except Exception as exc:  # nobody awaits this task: never let an error escape
                    self.background_failures += 1
                    log.warning("memcache: background increments lost: %s", exc)
        finally:
            self._flusher = None

    async def _apply(self, batch: dict[bytes, list[int]]) -> None:
        servers = self._live_servers()
        groups: dict[int, list[tuple[bytes, int, int]]] = {}
        for key, (hits, ttl) in batch.items():
            groups.setdefault(pick(key, len(servers)), []).append((key, hits, ttl))
        deadline = asyncio.get_running_loop().time() + self._op_timeout
        outcomes = await asyncio.gather(
            *(
                self._bounded(server, partial(self._apply_on, server, items), deadline)
                for index, items in groups.items()
                for server in (servers[index],)
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                self.background_failures += 1
                log.warning("memcache: background increments lost: %s", outcome)

    async def _apply_on(self, server: Server, items: list[tuple[bytes, int, int]]) -> None:
        """incr; add where missing; incr again where the add lost a race (the reference's
        dance, one pipelined write per step)."""
        values = await server.incr_many([(key, hits) for key, hits, _ in items])
        missing = [item for item, value in zip(items, values, strict=True) if value is None]
        if not missing:
            return
        stored = await server.add_many(
            [(key, hits, self._expiry(ttl)) for key, hits, ttl in missing]
        )
        raced = [item for item, ok in zip(missing, stored, strict=True) if not ok]
        if not raced:
            return
        again = await server.incr_many([(key, hits) for key, hits, _ in raced])
        lost = [key for (key, _, _), value in zip(raced, again, strict=True) if value is None]
        if lost:
            self.background_failures += 1
            log.warning("memcache: %d increments lost on %s (key vanished)", len(lost), server)

    def _expiry(self, ttl: int) -> int:
        if ttl > MAX_RELATIVE_EXPIRY:
            return int(self._wall_clock()) + ttl
        return ttl

    # -- servers ------------------------------------------------------------------------------

    def _live_servers(self) -> list[Server]:
        if not self._servers:
            raise BackendError("memcache: no servers (MEMCACHE_SRV not resolved yet?)")
        return self._servers

    def _server(self, address: str) -> Server:
        return Server(address, max_idle=self._max_idle, tls=self._tls)

    async def refresh_servers(self) -> bool:
        """Re-read MEMCACHE_SRV; True if the server list changed. Raises BackendError if the
        lookup fails or finds no server (the current list stays)."""
        records = await self._resolver(self._srv)
        addresses = servers_from_srv(records)
        if not addresses:
            raise BackendError(f"memcache: SRV record {self._srv!r} lists no server")
        if addresses == self.servers:
            return False
        current: dict[str, Server | None] = {server.address: server for server in self._servers}
        self._servers = [current.pop(a, None) or self._server(a) for a in addresses]
        log.info("memcache: servers from %s now %s", self._srv, ", ".join(addresses))
        self._retire([server for server in current.values() if server is not None])
        return True

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._srv_refresh)
            try:
                await self.refresh_servers()
            except BackendError as exc:
                log.warning("memcache: failed to refresh servers from SRV: %s", exc)

    def _retire(self, servers: list[Server]) -> None:
        """Close dropped servers once no call can still use them (calls end within the
        operation timeout)."""
        if not servers:
            return

        async def close_later() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(self._op_timeout)
            await asyncio.gather(*(server.close() for server in servers))

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


async def open_memcache_store(
    cfg: MemcacheSettings, *, op_timeout: float, clock: Callable[[], float]
) -> MemcacheStore:
    """MEMCACHE_* settings → a started store (no I/O except the SRV lookup)."""
    tls = None
    if cfg.tls:
        try:
            tls = tls_context(
                cacert=cfg.tls_cacert,
                client_cert=cfg.tls_client_cert,
                client_key=cfg.tls_client_key,
                skip_hostname=cfg.tls_skip_hostname_verification,
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise BackendError(f"memcache: cannot load the MEMCACHE_TLS_* files: {exc}") from None
    store = MemcacheStore(
        cfg.host_port,
        op_timeout=op_timeout,
        max_idle_conns=cfg.max_idle_conns,
        tls=tls,
        clock=clock,
        srv=cfg.srv,
        srv_refresh=cfg.srv_refresh,
    )
    try:
        await store.start()
    except BaseException:
        await store.close()
        raise
    return store


async def open_store(settings: Settings, clock: Callable[[], float]) -> MemcacheStore:
    """The backend table's factory (BACKEND_TYPE=memcache)."""
    return await open_memcache_store(
        settings.memcache, op_timeout=settings.redis_op_timeout, clock=clock
    )
