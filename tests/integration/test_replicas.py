"""Exactness across replicas (docs/backends.md (What each backend guarantees)): several service processes sharing one real Redis admit
exactly L requests per window under concurrent load, whichever replica each request reaches.

Hour-unit rules keep the test inside one window; should the hour turn during the test anyway, the
counters in Redis say how many windows were touched and the expectation scales with them.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.redis_fixtures import RedisServer
from support.service_env import base_env

from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 3
LIMITS = {"a": 50, "b": 17}
RULES = "domain: rep\ndescriptors:\n" + "".join(
    f"  - key: {key}\n    rate_limit: {{unit: hour, requests_per_unit: {limit}}}\n"
    for key, limit in LIMITS.items()
)
LISTENING = re.compile(r"Listening for gRPC on '127\.0\.0\.1:(\d+)'")


@pytest.fixture
def replicas(tmp_path: Path, redis_db: RedisServer) -> Iterator[list[int]]:
    """REPLICAS ``python -m ratelimit_svc`` processes on one Redis; yields their gRPC ports."""
    config_dir = tmp_path / "runtime" / "rl" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "rep.yaml").write_text(RULES)
    env = {
        **os.environ,
        **base_env(
            BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url,
            RUNTIME_ROOT=str(tmp_path / "runtime"), RUNTIME_SUBDIRECTORY="rl",
            RUNTIME_WATCH_ROOT="false", REDIS_POOL_SIZE="4", EXPIRATION_JITTER_MAX_SECONDS="300",
        ),
    }  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "ratelimit_svc"], env=env, cwd=ROOT,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        for _ in range(REPLICAS)
    ]
    try:
        ports = []
        for process in processes:
            assert process.stderr is not None
            seen = []
            for line in process.stderr:
                seen.append(line)
                found = LISTENING.search(line)
                if found:
                    ports.append(int(found.group(1)))
                    break
            else:
                raise AssertionError("replica did not start:\n" + "".join(seen))
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            assert process.stderr is not None
            process.stderr.close()


def request(key: str) -> rls_pb2.RateLimitRequest:
    d = ratelimit_pb2.RateLimitDescriptor()
    d.entries.add(key=key, value="shared")
    return rls_pb2.RateLimitRequest(domain="rep", descriptors=[d])


async def test_replicas_on_one_redis_admit_exactly_the_limit(
    replicas: list[int], redis_db: RedisServer
) -> None:
    per_key = 4 * max(LIMITS.values())
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in replicas]
    try:
        stubs = [rls_pb2_grpc.RateLimitServiceStub(c) for c in channels]
        calls = [
            stubs[n % REPLICAS].ShouldRateLimit(request(key), timeout=30)
            for n in range(per_key)
            for key in LIMITS
        ]
        answers = await asyncio.gather(*calls)
    finally:
        for channel in channels:
            await channel.close()
    admitted = dict.fromkeys(LIMITS, 0)
    for index, answer in enumerate(answers):
        key = list(LIMITS)[index % len(LIMITS)]
        assert answer.overall_code in (
            rls_pb2.RateLimitResponse.OK,
            rls_pb2.RateLimitResponse.OVER_LIMIT,
        )
        admitted[key] += answer.overall_code == rls_pb2.RateLimitResponse.OK
    with redis_db.client() as client:
        for key, limit in LIMITS.items():
            windows = client.keys(f"rep_{key}_shared_*")
            assert 1 <= len(windows) <= 2
            assert sum(int(client.get(w) or 0) for w in windows) == per_key
            assert admitted[key] == limit * len(windows), (key, admitted, windows)
