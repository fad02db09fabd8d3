"""Cross-request pipelining (REDIS_PIPELINE_WINDOW, REDIS_PIPELINE_LIMIT): ``Coalescer`` queues
the commands of concurrent calls and sends them as one batch per window, handing each caller its
own replies (docs/backends.md (Cross-request pipelining)).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ratelimit_svc.errors import BackendError

Command = tuple[str | int, ...]
Send = Callable[[Sequence[Command]], Awaitable[list[Any]]]

_Waiter = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]


class Coalescer:
    """Coalesces the commands of concurrent calls into one ``send`` per window."""

    def __init__(self, send: Send, *, window: float, limit: int = 0) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self._send = send
        self._window = window
        self._limit = limit
        self._queue: list[_Waiter] = []
        self._queued = 0
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches_sent = 0  # for tests and benchmarks: how many sends went out

    async def submit(self, commands: Sequence[Command]) -> list[Any]:
        """Queue ``commands`` for the next batch; their replies, in order."""
        if self._closed:
            raise BackendError("redis: the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, future))
        self._queued += len(commands)
        if self._limit and self._queued >= self._limit:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        # Cancelling this await cancels the future, which drops the commands if still queued.
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue, self._queued = self._queue, [], 0
        if batch:
            task = asyncio.get_running_loop().create_task(self._send_batch(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send_batch(self, batch: list[_Waiter]) -> None:
        live = [(commands, future) for commands, future in batch if not future.done()]
        if not live:
            return
        self.batches_sent += 1
        try:
            replies = await self._send([command for commands, _ in live for command in commands])
        except Exception as exc:
            for _, future in live:
                if not future.done():
                    # One exception object per caller: raising a shared one from several tasks
                    # would tangle their tracebacks.
                    error = exc if isinstance(exc, BackendError) else BackendError(str(exc))
                    future.set_exception(BackendError(*error.args))
            return
        except asyncio.CancelledError:
            for _, future in live:
                if not future.done():
                    future.set_exception(BackendError("redis: the store was closed"))
            raise
        position = 0
        for commands, future in live:
            end = position + len(commands)
            if not future.done():
                future.set_result(replies[position:end])
            position = end

    async def close(self) -> None:
        """Send what is queued, then wait for every batch in flight (each is bounded by the
        store's operation timeout)."""
        self._closed = True
        self._flush()
        for task in list(self._flushes):
            with contextlib.suppress(asyncio.CancelledError):
                await task
