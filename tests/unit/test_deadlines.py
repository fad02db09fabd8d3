"""The callers' deadlines under one loop timer (service.Deadlines, docs/performance.md (What the
hot path avoids)): a call past its deadline sees TimeoutError as under asyncio.timeout, calls that
finish in time are never cancelled, and finished calls do not pile up."""

from __future__ import annotations

import asyncio

import pytest

from ratelimit_svc.service import Deadlines


async def _call(deadlines: Deadlines, seconds: float, work: asyncio.Future[None]) -> str:
    deadline = deadlines.start(seconds)
    try:
        await work
    except asyncio.CancelledError:
        if deadlines.finish(deadline):
            raise TimeoutError from None
        raise
    deadlines.finish(deadline)
    return "done"


async def test_a_call_past_its_deadline_times_out_and_its_cancel_is_withdrawn() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    answered: asyncio.Future[None] = loop.create_future()
    late = asyncio.ensure_future(_call(deadlines, 0.02, never))
    early = asyncio.ensure_future(_call(deadlines, 30.0, answered))
    await asyncio.sleep(0)
    answered.set_result(None)
    assert await early == "done"
    with pytest.raises(TimeoutError):
        await late
    assert late.cancelling() == 0  # withdrawn: the task is not left cancelled
    assert len(deadlines) == 0


async def test_an_outside_cancel_stays_a_cancel() -> None:
    deadlines = Deadlines()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(_call(deadlines, 30.0, never))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_the_earliest_deadline_fires_first_whatever_the_order_of_arrival() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(_call(deadlines, 30.0, loop.create_future()))
    quick = asyncio.ensure_future(_call(deadlines, 0.01, loop.create_future()))
    with pytest.raises(TimeoutError):
        await quick
    assert not slow.done()
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow


async def test_calls_finished_in_time_do_not_pile_up() -> None:
    deadlines = Deadlines()
    for _ in range(1000):
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        assert await _call(deadlines, 60.0, done) == "done"
    assert len(deadlines) == 0
    assert len(deadlines._heap) <= 130  # finished ones are dropped once they are most of it
