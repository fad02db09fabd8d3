"""`make bench-algorithms` (and a row group of `make bench`): CPU per request of each counting
algorithm on Redis (docs/algorithms.md, "Cost").

Starts a Redis and drives the limiter in this process (config matching, the limiter, the Redis
store and its connection pool over TCP: the service minus gRPC) with ``CONCURRENCY`` requests in
flight, one descriptor each, spread over ``KEYS`` descriptor values. Per algorithm it measures the
process's CPU time (user + system) per request and Redis's own (INFO cpu) per request. Algorithms
are measured in turns within each of ``BENCH_ROUNDS`` rounds and every ratio is taken within a
round (the machine is shared: absolute figures drift, ratios much less); medians are reported.

Target (never checked by the test suite): sliding_window and token_bucket within 1.3x of
fixed_window in service CPU per request. A miss prints MISSED; with BENCH_STRICT=1 it exits 1.

Environment: BENCH_QUICK=1 (fewer requests, 1 round), BENCH_REQUESTS (per point, default 20000),
BENCH_ROUNDS (default 3), BENCH_OUT (default .bench). Results: a table on stdout and
``$BENCH_OUT/algorithms.json``. ``run(requests, rounds)`` is the same as a function.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ratelimit_svc.backends.redis import open_redis_store
from ratelimit_svc.config.loader import ConfigFile, load_config
from ratelimit_svc.limiter.limiter import Limiter, LimiterOptions, Request, RequestDescriptor
from ratelimit_svc.settings.model import RedisSettings
from ratelimit_svc.stats.registry import MemoryStats

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("fixed_window", "sliding_window", "token_bucket")
CONCURRENCY = 64
KEYS = 1000
TARGET_RATIO = 1.3
RULES = """\
domain: bench
descriptors:
  - {key: fixed_window, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - key: sliding_window
    rate_limit: {unit: second, requests_per_unit: 1000000000, algorithm: sliding_window}
  - key: token_bucket
    rate_limit: {unit: second, requests_per_unit: 1000000000, algorithm: token_bucket}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_cpu(port: int) -> float:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True, text=True, check=True
    ).stdout
    values = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return float(values["used_cpu_user"]) + float(values["used_cpu_sys"])


async def _point(
    limiter: Limiter, config: Any, algorithm: str, requests: int, port: int
) -> dict[str, float]:
    bodies = [
        Request("bench", (RequestDescriptor(((algorithm, f"v{i}"),)),)) for i in range(KEYS)
    ]
    queue = iter(range(requests))

    async def client() -> None:
        for n in queue:
            await limiter.should_rate_limit(config, bodies[n % KEYS])

    # A short warm-up (connections, the script cache), not measured.
    await asyncio.gather(*(limiter.should_rate_limit(config, b) for b in bodies[:CONCURRENCY]))
    redis_before, cpu_before, wall_before = _redis_cpu(port), time.process_time(), time.monotonic()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu_before, time.monotonic() - wall_before
    redis = _redis_cpu(port) - redis_before
    return {
        "service_cpu_us": cpu / requests * 1e6,
        "redis_cpu_us": redis / requests * 1e6,
        "rps": requests / wall,
    }


async def _round(requests: int, port: int) -> dict[str, dict[str, float]]:
    config = load_config([ConfigFile("bench.yaml", RULES)])
    store = await open_redis_store(
        RedisSettings(socket_type="tcp", url=f"127.0.0.1:{port}", pool_size=CONCURRENCY),
        op_timeout=5.0,
        startup_initial_interval=0.05,
        startup_max_interval=0.5,
        startup_max_elapsed=10.0,
    )
    try:
        limiter = Limiter(store=store, stats=MemoryStats(), options=LimiterOptions())
        return {a: await _point(limiter, config, a, requests, port) for a in ALGORITHMS}
    finally:
        await store.close()


def run(requests: int = 20000, rounds: int = 3) -> dict[str, Any]:
    """Start a Redis, measure every algorithm ``rounds`` times; medians and ratios to
    fixed_window (each ratio taken within its round)."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = _free_port()
    with tempfile.TemporaryDirectory() as work:
        process = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", work],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while subprocess.run(
                ["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True
            ).stdout.strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            points = [asyncio.run(_round(requests, port)) for _ in range(rounds)]
        finally:
            process.terminate()
            process.wait(timeout=10)
    summary: dict[str, Any] = {}
    for algorithm in ALGORITHMS:
        row = {
            name: statistics.median(p[algorithm][name] for p in points)
            for name in ("service_cpu_us", "redis_cpu_us", "rps")
        }
        row["service_cpu_ratio"] = statistics.median(
            p[algorithm]["service_cpu_us"] / p["fixed_window"]["service_cpu_us"] for p in points
        )
        row["redis_cpu_ratio"] = statistics.median(
            p[algorithm]["redis_cpu_us"] / max(p["fixed_window"]["redis_cpu_us"], 1e-9)
            for p in points
        )
        summary[algorithm] = row
    return {"requests": requests, "rounds": rounds, "concurrency": CONCURRENCY, "results": summary}


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    requests = int(os.environ.get("BENCH_REQUESTS", "5000" if quick else "20000"))
    rounds = int(os.environ.get("BENCH_ROUNDS", "1" if quick else "3"))
    result = run(requests, rounds)
    out = Path(os.environ.get("BENCH_OUT", ROOT / ".bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "algorithms.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"algorithms on Redis ({requests} requests x {rounds} rounds, {CONCURRENCY} in flight)")
    print(
        f"{'algorithm':<16}{'service CPU/req':>17}{'ratio':>7}{'Redis CPU/req':>15}"
        f"{'ratio':>7}{'req/s':>9}"
    )
    missed = False
    for algorithm, row in result["results"].items():
        print(
            f"{algorithm:<16}{row['service_cpu_us']:>14.1f} us{row['service_cpu_ratio']:>7.2f}"
            f"{row['redis_cpu_us']:>12.1f} us{row['redis_cpu_ratio']:>7.2f}{row['rps']:>9.0f}"
        )
        if algorithm != "fixed_window" and row["service_cpu_ratio"] > TARGET_RATIO:
            print(f"  MISSED: {algorithm} service CPU per request > {TARGET_RATIO}x fixed_window")
            missed = True
    return 1 if missed and os.environ.get("BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
