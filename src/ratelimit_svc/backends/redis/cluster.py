"""Counters in a Redis Cluster (REDIS_TYPE=cluster): the slot map, one pipeline per node over
``client.ServerClient``, ``MOVED``/``ASK`` redirects and a slot-map refresh after a node fails,
every call bounded by REDIS_OP_TIMEOUT; nothing is resent after a connection error
(docs/backends.md (Redis Cluster)).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ratelimit_svc.backends.redis.client import ServerClient
from ratelimit_svc.backends.redis.connection import (
    CommandStore,
    Redactor,
    endpoint,
    split_host_port,
)
from ratelimit_svc.backends.redis.protocol import RESET_ON, Command, PoolStats, ReplyError
from ratelimit_svc.errors import BackendError, raise_unless_any_answered
from ratelimit_svc.limiter.algorithms import Step

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings

log = logging.getLogger(__name__)

SLOTS = 16384
MAX_REDIRECTS = 16  # redirect rounds per call (as redis-py), all within the one deadline
REDIRECT_PAUSE = 0.02  # seconds between rounds from the third on
REFRESH_MIN_INTERVAL = 0.1  # seconds between two CLUSTER SLOTS refreshes, at most one at a time
REFRESH_FANOUT = 3  # nodes asked for CLUSTER SLOTS at once (the first answer wins)


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``: CRC16 (XMODEM) of the key, or of its ``{hash tag}`` when
    the braces hold at least one byte, modulo 16384."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


def redirect(reply: Any) -> tuple[str, int, str] | None:
    """(``MOVED`` or ``ASK``, slot, target node) for a redirect reply, else None."""
    if type(reply) is not ReplyError or reply.prefix not in ("MOVED", "ASK"):
        return None
    prefix, slot, target = str(reply).split()
    host, port = split_host_port(target, "node address")
    return prefix, int(slot), node_name(host, port)


def node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_cluster_slots(reply: Any, asked_host: str) -> list[str | None]:
    """CLUSTER SLOTS (RESP2) → the primary's ``host:port`` for each of the 16384 slots."""
    slots: list[str | None] = [None] * SLOTS
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        if host == "?":  # an unknown endpoint: no usable address
            continue
        name = node_name(host or asked_host, int(primary[1]))
        for slot in range(start, end + 1):
            slots[slot] = name
    return slots


async def _first_answer(
    tasks: Sequence[asyncio.Future[list[str | None]]], errors: list[BaseException]
) -> list[str | None] | None:
    """The first slot map one of ``tasks`` answers; None when every one failed (their errors
    appended to ``errors``)."""
    for next_done in asyncio.as_completed(tasks):
        try:
            return await next_done
        except BackendError as exc:
            errors.append(exc)
    return None


async def _end_all(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel those still running and wait until every one has ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ClusterStore(CommandStore):
    """Counters in a Redis Cluster (REDIS_TYPE=cluster). Sockets open lazily."""

    def __init__(self, cfg: RedisSettings, *, op_timeout: float) -> None:
        super().__init__(
            op_timeout=op_timeout,
            pipeline_window=cfg.pipeline_window,
            pipeline_limit=cfg.pipeline_limit,
        )
        seeds = [split_host_port(url) for url in cfg.url.split(",") if url.strip()]
        if not seeds:
            raise BackendError(f"redis: invalid REDIS_URL {cfg.url!r}: expected h1:p1,h2:p2,...")
        self._seeds = [node_name(host, port) for host, port in seeds]
        self.address = ",".join(self._seeds)
        self._redactor = Redactor(cfg.auth)
        self._stats = PoolStats()
        self._cfg = cfg
        self._nodes: dict[str, ServerClient] = {}
        self._slots: list[str | None] = [None] * SLOTS
        self._covered = 0
        self._stale = True
        self._failed: set[str] = set()  # nodes that failed since the last refresh: asked last
        self._refresh: asyncio.Task[None] | None = None
        self._refresh_error: BackendError | None = None
        self._next_refresh_at = 0.0
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self._description = f"cluster{'+tls' if cfg.tls else ''} {self.address}"

    def __repr__(self) -> str:
        return f"ClusterStore({self._description})"

    def _redact(self, text: str) -> str:
        return self._redactor(text)

    def pool_stats(self) -> dict[str, int]:
        """Connection counts summed over every node."""
        return self._stats.as_dict()

    def primaries(self) -> list[str]:
        """The nodes that own slots in the current map (for tests and debugging)."""
        return sorted({name for name in self._slots if name is not None})

    def node_for_key(self, key: str) -> str | None:
        return self._slots[key_slot(key.encode())]

    # -- the CounterStore contract -----------------------------------------------------------

    async def get(self, keys: Sequence[str]) -> list[int]:
        # MGET would fail across slots; GETs are grouped per node like any other command.
        replies = await self._run([("GET", key) for key in keys])
        return [0 if reply is None else self._as_int(reply, key)
                for reply, key in zip(replies, keys, strict=True)]  # fmt: skip

    async def ping(self) -> None:
        """The slot map covers every slot and at least one primary answers PING.

        One dead primary does not fail it: the other slots still serve (their calls succeed, the
        dead node's fail), and an unhealthy report would take every replica of the service out
        of its load balancer at once.
        """
        deadline = asyncio.get_running_loop().time() + self._op_timeout
        await self._await_topology(deadline)
        if self._covered < SLOTS:
            self._stale = True
            raise BackendError(
                f"redis: cluster {self.address} serves {self._covered} of {SLOTS} slots"
            )
        primaries = self.primaries()
        outcomes = await asyncio.gather(
            *(self._exchange(name, [("PING",)], deadline) for name in primaries),
            return_exceptions=True,
        )
        raise_unless_any_answered(outcomes)

    async def close(self) -> None:
        self._closed = True
        await super().close()
        tasks = [t for t in (self._refresh, *self._retiring) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        nodes, self._nodes = self._nodes, {}
        await asyncio.gather(*(pool.close() for pool in nodes.values()), return_exceptions=True)

    # -- one call: group by node, send concurrently, follow redirects -------------------------

    async def _round_trip(self, commands: Sequence[Command]) -> list[Any]:
        # No outer timeout: every await below runs under this one deadline, so a timeout can name
        # the node that did not answer.
        deadline = asyncio.get_running_loop().time() + self._op_timeout
        await self._await_topology(deadline, wait=self._covered == 0)
        groups = self._group(commands)
        if self._refresh is not None and any(name in self._failed for name, _ in groups):
            # This call needs a node that just failed: the refresh in progress may have found
            # its replacement. Calls to healthy nodes do not wait for it.
            await self._await_topology(deadline, wait=True)
            groups = self._group(commands)
        replies: list[Any] = [None] * len(commands)
        await self._send_groups(groups, commands, replies, deadline)
        for round_ in range(MAX_REDIRECTS):
            redirects: dict[tuple[str, bool], list[int]] = {}
            for index, reply in enumerate(replies):
                if type(reply) is not ReplyError:
                    continue
                moved = redirect(reply)
                if moved is None:
                    if reply.prefix == "CLUSTERDOWN":
                        self._stale = True
                    continue
                kind, slot, target = moved
                if kind == "MOVED":
                    self._slots[slot] = target
                    self._stale = True  # a resharding moves more than one slot: re-read them
                redirects.setdefault((target, kind == "ASK"), []).append(index)
            if not redirects:
                return replies
            if round_ >= 2:
                # Nodes still disagree (a slot handed over a moment ago): give them a moment.
                await self._pause(REDIRECT_PAUSE, deadline)
            await self._send_groups(redirects, commands, replies, deadline)
        return replies  # still redirected: the MOVED/ASK error is raised to the caller

    async def _pause(self, seconds: float, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(seconds)
        except TimeoutError:
            raise BackendError(
                f"redis: cluster {self.address}: slots still moving after {self._op_timeout:g}s"
            ) from None

    def _script_groups(self, steps: Sequence[Step]) -> list[list[int]] | None:
        by_slot: dict[int, list[int]] = {}
        for index, step in enumerate(steps):
            by_slot.setdefault(key_slot(step.key.encode()), []).append(index)
        return list(by_slot.values()) if len(by_slot) > 1 else None

    def _group(self, commands: Sequence[Command]) -> dict[tuple[str, bool], list[int]]:
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, command in enumerate(commands):
            groups.setdefault((self._owner(command), False), []).append(index)
        return groups

    def _owner(self, command: Command) -> str:
        if len(command) < 2:  # PING and the like: any primary
            primaries = self.primaries()
            if primaries:
                return random.choice(primaries)
            return self._seeds[0]
        # A script's first key (its keys share a slot: ``_script_groups``).
        key = command[3] if command[0] in ("EVALSHA", "EVAL") else command[1]
        slot = key_slot(key.encode() if isinstance(key, str) else str(key).encode())
        owner = self._slots[slot]
        if owner is None:
            self._stale = True
            raise BackendError(f"redis: cluster {self.address} has no node serving slot {slot}")
        return owner

    async def _send_groups(
        self,
        groups: dict[tuple[str, bool], list[int]],
        commands: Sequence[Command],
        replies: list[Any],
        deadline: float,
    ) -> None:
        """Send each node its commands (after ASKING each, for ASK redirects), concurrently;
        fill ``replies``; raise the first node failure once every node has answered or failed."""

        async def send(name: str, asking: bool, indexes: list[int]) -> None:
            batch = [commands[i] for i in indexes]
            if asking:
                batch = [c for command in batch for c in (("ASKING",), command)]
            answers = await self._exchange(name, batch, deadline)
            for index, answer in zip(indexes, answers[1::2] if asking else answers, strict=True):
                replies[index] = answer

        outcomes = await asyncio.gather(
            *(send(name, asking, indexes) for (name, asking), indexes in groups.items()),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _exchange(self, name: str, commands: Sequence[Command], deadline: float) -> list[Any]:
        try:
            return await self._node(name).exchange(commands, deadline)
        except BackendError:
            self._node_failed(name)
            raise

    def _node(self, name: str) -> ServerClient:
        client = self._nodes.get(name)
        if client is None:
            if self._closed:
                raise BackendError("redis: the store is closed")
            host, port = split_host_port(name)
            client = ServerClient(
                endpoint(self._cfg, host=host, port=port),
                op_timeout=self._op_timeout,
                redact=self._redactor,
                stats=self._stats,
                # MOVED is a redirect here, followed above; the connection stays.
                reset_on=RESET_ON - {"MOVED"},
            )
            self._nodes[name] = client
        return client

    def _node_failed(self, name: str) -> None:
        self._failed.add(name)
        self._stale = True

    # -- the slot map ---------------------------------------------------------------------------

    async def _await_topology(self, deadline: float, *, wait: bool = True) -> None:
        """Start a refresh if the map is stale (at most one at a time, not too often) and, with
        ``wait``, wait for the refresh in progress; without any map, its failure is this call's."""
        loop = asyncio.get_running_loop()
        if self._stale and self._refresh is None and loop.time() >= self._next_refresh_at:
            self._refresh = loop.create_task(self._refresh_slots())
        task = self._refresh
        if task is not None and wait:
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(task)
            except TimeoutError:
                raise BackendError(
                    f"redis: cluster {self.address}: no CLUSTER SLOTS answer "
                    f"within {self._op_timeout:g}s"
                ) from None
        if self._covered == 0:
            error = self._refresh_error
            raise (
                error
                if error is not None
                else BackendError(f"redis: cluster {self.address}: no slot map yet")
            )

    async def _refresh_slots(self) -> None:
        """Re-read the slot map; never raises (the error is kept for callers without a map)."""
        try:
            async with asyncio.timeout(self._op_timeout):
                slots = await self._ask_for_slots()
        except (BackendError, TimeoutError) as exc:
            first = self._refresh_error is None
            self._refresh_error = (
                exc
                if isinstance(exc, BackendError)
                else BackendError(
                    f"redis: cluster {self.address}: no CLUSTER SLOTS answer "
                    f"within {self._op_timeout:g}s"
                )
            )
            # Refreshes repeat while the cluster is unreachable: say so once, not each time.
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "redis cluster: slot map refresh failed: %s",
                self._refresh_error,
            )
        else:
            old_primaries = set(self.primaries())
            self._slots = slots
            self._covered = sum(1 for name in slots if name is not None)
            self._stale = self._covered < SLOTS
            self._failed.clear()
            if self._refresh_error is not None:
                log.info("redis cluster: slot map refreshed again")
            self._refresh_error = None
            new_primaries = set(self.primaries())
            if new_primaries != old_primaries:
                log.info("redis cluster: primaries now %s", ", ".join(sorted(new_primaries)))
            self._retire(set(self._nodes) - new_primaries - set(self._seeds))
        finally:
            self._refresh = None
            self._next_refresh_at = asyncio.get_running_loop().time() + REFRESH_MIN_INTERVAL

    async def _ask_for_slots(self) -> list[str | None]:
        """CLUSTER SLOTS from the first of a few known nodes to answer; failed nodes last."""
        known = [*self.primaries(), *self._seeds, *self._nodes]
        candidates = list(dict.fromkeys(n for n in known if n not in self._failed))
        candidates += [n for n in dict.fromkeys(known) if n in self._failed]
        errors: list[BaseException] = []
        for start in range(0, len(candidates), REFRESH_FANOUT):
            tasks = [
                asyncio.ensure_future(self._slots_from(name))
                for name in candidates[start : start + REFRESH_FANOUT]
            ]
            # Not in a finally: compiled, an await there raises a stale exception
            # (docs/performance.md, Compiled modules).
            try:
                slots = await _first_answer(tasks, errors)
            except BaseException:  # cancelled: the refresh timed out, or the store closes
                await _end_all(tasks)
                raise
            await _end_all(tasks)
            if slots is not None:
                return slots
        raise BackendError(
            f"redis: cluster {self.address}: no node answered CLUSTER SLOTS"
            + (f" (last error: {errors[-1]})" if errors else "")
        )

    async def _slots_from(self, name: str) -> list[str | None]:
        (reply,) = await self._node(name).exchange([("CLUSTER", "SLOTS")])
        if isinstance(reply, ReplyError):
            raise BackendError(f"redis: {name} answered CLUSTER SLOTS with {reply}")
        try:
            return parse_cluster_slots(reply, split_host_port(name)[0])
        except (TypeError, ValueError, IndexError):
            raise BackendError(f"redis: unexpected reply to CLUSTER SLOTS from {name}") from None

    def _retire(self, names: Iterable[str]) -> None:
        """Close the pools of nodes that left the map once no call can still be using them
        (every call ends within the operation timeout)."""
        pools = [self._nodes.pop(name) for name in names if name in self._nodes]
        if not pools:
            return

        async def close_later() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(self._op_timeout)
            await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
