"""What every Redis store type shares (docs/backends.md, Redis): how to reach one server
(``endpoint``: TCP, TLS, unix socket, AUTH, database), credential redaction, the sorting of error
replies into key-level ones (``CounterError``) and the rest (``BackendError``), and
``CommandStore``: the ``CounterStore`` contract as INCRBY+EXPIRE, MGET and a health probe that a
replica fails, over one round trip on ``client.ServerClient`` (bounded by the operation timeout,
optionally coalesced further by REDIS_PIPELINE_WINDOW). Credentials never reach logs or
``repr``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ratelimit_svc.backends.redis import scripts as redis_scripts
from ratelimit_svc.backends.redis.client import Endpoint, tls_context
from ratelimit_svc.backends.redis.pipelining import Coalescer
from ratelimit_svc.backends.redis.protocol import (
    Command,
    ReplyError,
    increment_commands,
    pack_increments,
)
from ratelimit_svc.errors import BackendError, CounterError
from ratelimit_svc.limiter.algorithms import Step, StepResult, refund_unadmitted
from ratelimit_svc.limiter.store import Increment

if TYPE_CHECKING:
    from ratelimit_svc.settings.model import RedisSettings

log = logging.getLogger(__name__)

# The health probe's write: EXPIRE of a key nobody uses is a no-op on a primary (nothing is
# created or replicated) and READONLY on a replica, so a replica is never "healthy".
PROBE_KEY = "ratelimit_svc_health_probe"
# Error replies that say the server (not one key) cannot serve: they count as backend failures.
SERVER_STATES = frozenset(
    {"READONLY", "LOADING", "MASTERDOWN", "OOM", "NOAUTH", "WRONGPASS", "BUSY", "MISCONF",
     "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK", "NOREPLICAS", "NOPERM"}
)  # fmt: skip


def is_key_error(reply: ReplyError) -> bool:
    """An error about one key's value (not the server's state): WRONGTYPE, a value that is not
    an integer, an increment that would overflow."""
    prefix = reply.prefix
    if prefix == "WRONGTYPE":
        return True
    if prefix != "ERR":
        return False
    text = str(reply)
    return "not an integer" in text or "would overflow" in text


def split_auth(auth: str) -> tuple[str | None, str | None]:
    """REDIS_AUTH → (username, password): ``password`` or ``user:password`` (first colon)."""
    if not auth:
        return None, None
    user, colon, password = auth.partition(":")
    return (user, password) if colon else (None, auth)


def split_host_port(url: str, variable: str = "REDIS_URL") -> tuple[str, int]:
    host, colon, port = url.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"redis: invalid {variable} {url!r}: expected host:port")
    return host, int(port)


class Redactor:
    """Masks every credential of one connection setting in texts bound for errors and logs."""

    def __init__(self, *auths: str) -> None:
        secrets: set[str] = set()
        for auth in auths:
            secrets.update(s for s in (auth, split_auth(auth)[1]) if s)
        # Longest first, so "user:pw" is masked before "pw" alone.
        self._secrets = tuple(sorted(secrets, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text


def endpoint(
    cfg: RedisSettings, *, host: str = "", port: int = 0, path: str = "", auth: str | None = None
) -> Endpoint:
    """Where and how to reach one server of ``cfg``: TLS (REDIS_TLS_*), REDIS_AUTH (or ``auth``),
    the database; a unix socket when ``path`` is given."""
    username, password = split_auth(cfg.auth if auth is None else auth)
    if path and cfg.tls:
        raise BackendError("redis: REDIS_TLS is not supported with REDIS_SOCKET_TYPE=unix")
    tls = None
    if cfg.tls:
        try:
            tls = tls_context(
                cafile=cfg.tls_cacert,
                certfile=cfg.tls_client_cert,
                keyfile=cfg.tls_client_key,
                # The chain is still verified against the CA; only the name check is skipped.
                check_hostname=not cfg.tls_skip_hostname_verification,
            )
        except (OSError, ValueError) as exc:
            raise BackendError(f"redis: cannot load the REDIS_TLS_* files: {exc}") from None
    return Endpoint(
        host=host,
        port=port,
        path=path,
        tls=tls,
        username=username,
        password=password,
        db=cfg.db,
    )


class CommandStore:
    """The ``CounterStore`` contract as Redis commands, over ``_send`` (one round trip).

    Subclasses define ``_send`` and bound it by ``op_timeout``. With a pipeline window, the
    commands of concurrent calls are also held for the window and sent as one ``_send``.
    """

    label = "redis"
    address = ""

    def __init__(
        self, *, op_timeout: float, pipeline_window: float = 0.0, pipeline_limit: int = 0
    ) -> None:
        self._op_timeout = op_timeout
        self._coalescer = (
            Coalescer(self._round_trip, window=pipeline_window, limit=pipeline_limit)
            if pipeline_window > 0
            else None
        )
        self.key_errors = 0  # error replies about one key (CounterError), for stats and tests

    def _send(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        raise NotImplementedError

    def pool_stats(self) -> dict[str, int]:
        """Connection counts: ``cx_active``, ``cx_total`` and ``cx_local_close``."""
        raise NotImplementedError

    def _redact(self, text: str) -> str:
        return text

    async def increment(self, increments: Sequence[Increment]) -> list[int]:
        if not increments:
            return []
        packed = self._packed_sender() if self._coalescer is None else None
        if packed is not None:
            replies = await packed(pack_increments(increments), 2 * len(increments))
        else:
            replies = await self._replies(increment_commands(increments))
        for reply in replies:
            if type(reply) is not int:  # an error reply, or not a number: the slow way
                commands = increment_commands(increments)
                self._check(replies, commands)
                return [self._as_int(reply, command[1]) for reply, command in
                        zip(replies[::2], commands[::2], strict=True)]  # fmt: skip
        return replies[::2]

    def _packed_sender(self) -> Callable[[bytes, int], Awaitable[list[Any]]] | None:
        """Where commands already packed can go in one round trip (None: only as commands,
        e.g. a cluster routes each by its key)."""
        return None

    async def get(self, keys: Sequence[str]) -> list[int]:
        if not keys:
            return []
        (values,) = await self._run([("MGET", *keys)])
        if not isinstance(values, list) or len(values) != len(keys):
            raise BackendError(f"{self.label}: unexpected reply to MGET from {self.address}")
        return [0 if value is None else self._as_int(value, key)
                for value, key in zip(values, keys, strict=True)]  # fmt: skip

    async def settle(
        self, steps: Sequence[Step], now: int, *, refund: bool = False
    ) -> list[StepResult]:
        """Run the settle script (docs/algorithms.md) once per group of keys that must meet on
        one server; several groups are settled one by one atomically and refunded together."""
        if not steps:
            return []
        groups = self._script_groups(steps)
        if groups is None:  # the common case: one script for the whole batch
            (reply,) = await self._script([steps], now, refund)
            return [] if refund else redis_scripts.parse(reply, len(steps), self.address)
        batches = [[steps[i] for i in group] for group in groups]
        replies = await self._script(batches, now, refund)
        if refund:
            return []
        results: list[StepResult] = [StepResult(False, False, 0, 0)] * len(steps)
        for group, reply in zip(groups, replies, strict=True):
            parsed = redis_scripts.parse(reply, len(group), self.address)
            for index, result in zip(group, parsed, strict=True):
                results[index] = result
        return await refund_unadmitted(self, steps, results, now)

    async def _script(
        self, batches: Sequence[Sequence[Step]], now: int, refund: bool
    ) -> list[Any]:
        """One EVALSHA per batch; those answered NOSCRIPT once more as EVAL (which loads it)."""
        replies = await self._run(
            [redis_scripts.evalsha(b, now, refund=refund) for b in batches], checked=False
        )
        missing = [
            i
            for i, reply in enumerate(replies)
            if type(reply) is ReplyError and reply.prefix == "NOSCRIPT"
        ]
        if missing:
            again = await self._run(
                [redis_scripts.eval_(batches[i], now, refund=refund) for i in missing],
                checked=False,
            )
            for index, reply in zip(missing, again, strict=True):
                replies[index] = reply
        for batch, reply in zip(batches, replies, strict=True):
            if type(reply) is ReplyError:
                self._raise_for(reply, ("EVALSHA", "", "", batch[0].key))
        return replies

    def _script_groups(self, steps: Sequence[Step]) -> list[list[int]] | None:
        """Indexes of the steps one script may run together (None: all of them, on one
        server)."""
        return None

    async def ping(self) -> None:
        """PING, and a write that a replica refuses (``PROBE_KEY``): the server answers and
        takes writes. Any other error reply to the write (a proxy or an ACL that does not allow
        it) leaves the answer to PING alone."""
        pong, probe = await self._round_trip([("PING",), ("EXPIRE", PROBE_KEY, 1)])
        if isinstance(pong, ReplyError):
            raise self._backend_error(pong)
        if isinstance(probe, ReplyError) and probe.prefix in SERVER_STATES:
            raise self._backend_error(probe)

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()

    async def _run(self, commands: Sequence[Command], *, checked: bool = True) -> list[Any]:
        if not commands:
            return []
        replies = await self._replies(commands)
        if checked:
            self._check(replies, commands)
        return replies

    def _replies(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        """The replies to ``commands`` in one round trip (coalesced with other calls' under
        REDIS_PIPELINE_WINDOW)."""
        if self._coalescer is not None:
            return self._coalescer.submit(commands)
        return self._round_trip(commands)

    def _check(self, replies: Sequence[Any], commands: Sequence[Command]) -> None:
        """Raise for the first error reply: CounterError about one key, else BackendError."""
        for index, reply in enumerate(replies):
            if type(reply) is ReplyError:
                self._raise_for(reply, commands[index])

    def _raise_for(self, reply: ReplyError, command: Command) -> None:
        if is_key_error(reply):
            scripted = command[0] in ("EVALSHA", "EVAL")  # a script's first key
            key = command[3] if scripted else command[1] if len(command) > 1 else "?"
            self.key_errors += 1
            raise CounterError(
                f"{self.label}: counter {key!r} cannot be counted: {self._redact(str(reply))} "
                f"({self.address})"
            )
        raise self._backend_error(reply)

    def _backend_error(self, reply: ReplyError) -> BackendError:
        text = self._redact(str(reply))
        if self.address not in text:
            text = f"{text} ({self.address})"
        return BackendError(f"{self.label}: {text}")

    def _round_trip(self, commands: Sequence[Command]) -> Awaitable[list[Any]]:
        """``_send``: one round trip, bounded by the operation timeout. A plain call returning
        the awaitable: no coroutine layer per request (docs/performance.md)."""
        return self._send(commands)

    def _as_int(self, reply: Any, key: Any) -> int:
        try:
            return int(reply)
        except (TypeError, ValueError):
            self.key_errors += 1
            raise CounterError(
                f"{self.label}: counter {key!r} holds {reply!r}, not a number ({self.address})"
            ) from None
