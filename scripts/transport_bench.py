"""CPU per request of ShouldRateLimit on each gRPC transport (docs/transports.md, CPU per request).

``start_service`` runs ``python -m ratelimit_svc`` on one transport (GRPC_SERVER) and backend and
waits until it answers; ``measure`` drives it with h2load and returns req/s, latency and CPU per
request (user + system time of the service's processes, Envoy included, ÷ requests). ``make
bench`` can call both; run alone, this prints a table for the trivial path (a domain without
rules: no backend call) and the full path (one descriptor counted in the backend), e.g.
``python scripts/transport_bench.py --requests 40000 --redis``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (
    _INHERITED,
    COMMON_ENV,
    Server,
    cpu_seconds,
    find_redis_server,
    find_tool,
    free_port,
    rss_mib,
)

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
RULES = """\
domain: bench
descriptors:
  - key: k1
    rate_limit: {unit: second, requests_per_unit: 1000000000}
"""


def request_file(directory: Path, domain: str, keys: list[str]) -> Path:
    """One gRPC frame holding a RateLimitRequest, for h2load's ``-d``."""
    request = rls_pb2.RateLimitRequest(domain=domain)
    for key in keys:
        request.descriptors.add().entries.add(key=key, value="v")
    body = request.SerializeToString()
    path = directory / f"{domain}-{len(keys)}.bin"
    path.write_bytes(b"\0" + struct.pack(">I", len(body)) + body)
    return path


@contextlib.contextmanager
def start_service(
    transport: str, workdir: Path, *, redis_url: str = "", workers: int = 1,
    extra: dict[str, str] | None = None,
) -> Iterator[tuple[Server, int]]:
    """The service on ``transport`` ("pyvoy" or "grpcio"), memory backend unless ``redis_url``;
    yields the server (``pids()`` covers Envoy too) and its gRPC port, and stops it after."""
    config = workdir / "runtime" / "bench" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "bench.yaml").write_text(RULES)
    port = free_port()
    env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
    env.update(COMMON_ENV)
    env.update(
        GRPC_SERVER=transport, GRPC_PORT=str(port), PORT=str(free_port()),
        DEBUG_PORT=str(free_port()), RUNTIME_ROOT=str(workdir / "runtime"),
        WORKERS=str(workers), LOG_LEVEL="WARNING",
    )  # fmt: skip
    if redis_url:
        env.update(BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_url)
    else:
        env.update(BACKEND_TYPE="memory")
    env.update(extra or {})
    server = Server([sys.executable, "-m", "ratelimit_svc"], env, workdir / f"{transport}.log")
    try:
        line = server.wait_for(r"Listening for gRPC on '[^']*'")[0]
        if (transport == "pyvoy") != ("pyvoy" in server.log_path.read_text()):
            raise RuntimeError(f"not on {transport}: {line}")
        yield server, port
    finally:
        server.stop()


def measure(
    server: Server, port: int, body: Path, *, requests: int, clients: int = 4, streams: int = 16
) -> dict[str, float]:
    """h2load against the service: req/s, mean and max latency (ms), CPU µs per request, RSS."""
    h2load = find_tool("h2load", "apt-get install nghttp2-client")
    warmup = [h2load, "-n", str(max(1000, requests // 10)), "-c", str(clients), "-m", str(streams),
              "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
              f"http://127.0.0.1:{port}{METHOD}"]  # fmt: skip
    subprocess.run(warmup, capture_output=True, check=True)
    pids = server.pids()
    before = cpu_seconds(pids)
    started = time.monotonic()
    run = [*warmup[:2], str(requests), *warmup[3:]]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - before
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    if done is None or int(done[2]) or int(done[1]) != requests:
        raise RuntimeError(f"h2load failures:\n{out}")
    latency = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {
        "req_s": requests / elapsed,
        "cpu_us": cpu / requests * 1e6,
        "mean_ms": _ms(latency[3]) if latency else float("nan"),
        "max_ms": _ms(latency[2]) if latency else float("nan"),
        "rss_mib": rss_mib(pids),
    }


def _ms(text: str) -> float:
    """h2load's "12.34ms", "567us" or "1.2s" in milliseconds."""
    value = float(re.sub(r"[a-z]+$", "", text))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="the median of this many runs")
    parser.add_argument("--redis", action="store_true", help="also on Redis (redis-server)")
    parser.add_argument("--only-redis", action="store_true", help="Redis only (implies --redis)")
    parser.add_argument("--transports", default="pyvoy,grpcio", help="comma-separated")
    parser.add_argument("--paths", default="trivial,full", help="comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="WORKERS")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        work = Path(tmp)
        bodies = {  # trivial: a domain without rules, no backend call; full: one counted descriptor
            "trivial": request_file(work, "nobody", ["k1"]),
            "full": request_file(work, "bench", ["k1"]),
        }
        bodies = {path: bodies[path] for path in args.paths.split(",")}
        backends = [] if args.only_redis else [("memory", "")]
        redis = None
        if args.redis or args.only_redis:
            redis_port = free_port()
            argv = [find_redis_server(), "--port", str(redis_port), "--save", ""]
            redis = Server(argv, {}, work / "redis.log")
            redis.wait_for("[Rr]eady to accept connections")
            backends.append(("redis", f"127.0.0.1:{redis_port}"))
        try:
            for backend, url in backends:
                for transport in args.transports.split(","):
                    workdir = work / f"{transport}-{backend}"
                    with start_service(
                        transport, workdir, redis_url=url, workers=args.workers
                    ) as (server, port):
                        for path, body in bodies.items():
                            runs = sorted(
                                (measure(server, port, body, requests=args.requests)
                                 for _ in range(args.rounds)),
                                key=lambda r: r["cpu_us"],
                            )  # fmt: skip
                            rows.append((backend, transport, path, runs[len(runs) // 2]))
        finally:
            if redis is not None:
                redis.stop()
    print(f"{'backend':8} {'transport':9} {'path':8} {'req/s':>8} {'CPU µs/req':>10} "
          f"{'mean ms':>8} {'RSS MiB':>8}")
    for backend, transport, path, r in rows:
        print(f"{backend:8} {transport:9} {path:8} {r['req_s']:8.0f} {r['cpu_us']:10.1f} "
              f"{r['mean_ms']:8.2f} {r['rss_mib']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
