"""`make bench-reload`: how a big config reload affects serving (docs/reliability.md).

Starts the service (``python -m ratelimit_svc``, memory backend, one process: the case where a
stalled loop is all the traffic) on a small config, keeps ``BENCH_RELOAD_CALLERS`` gRPC callers
sending ShouldRateLimit back to back, and swaps in config files of 10,000 and then 100,000
descriptors (one ``rename`` each, as a deploy does). For each load: the load time the service
logs ("config loaded in ..."), the slowest call and the p99 of calls that overlapped the reload
(from the rename until the new config was in), and RSS of the serving process (on pyvoy the
Envoy with the service embedded; before, peak during, after) and of the load process (its peak).

Targets: 10,000 descriptors load in <= 1 s with no call slower than 50 ms; 100,000 with no call
slower than 200 ms. A miss prints MISSED; it fails the run (exit 1) only with BENCH_STRICT=1.
Each row also shows the slowest call and p99 over as long a time right after, with no reload:
the machine's own noise, to read the reload's figures against.
Environment: BENCH_RELOAD_SIZES (default ``10000,100000``), BENCH_RELOAD_CALLERS (default 4),
BENCH_RELOAD_NICE (a niceness for the service and the callers, e.g. -5 as root on a shared machine:
the load process still runs 10 below the service),
BENCH_OUT (default .bench; results in ``$BENCH_OUT/reload.json``). ``run()`` is what
``scripts/bench.py`` can call; it returns the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import grpc  # noqa: E402
from stack import Process, start_service  # noqa: E402

from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: E402
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc  # noqa: E402

SMALL = (
    "domain: bench\ndescriptors:\n"
    "  - key: client\n    rate_limit: {unit: hour, requests_per_unit: 1000000000}\n"
)
TARGETS = {10_000: (1.0, 50.0), 100_000: (None, 200.0)}  # descriptors: (load s, slowest call ms)
LOAD_TIMEOUT = 600.0
SAMPLE_SECONDS = 0.05


def big_config(descriptors: int) -> str:
    """``descriptors`` rules (about 110 bytes each); the callers' ``client`` rule stays first."""
    lines = [SMALL]
    for i in range(descriptors - 1):
        lines.append(
            f"  - key: client_id\n    value: client-{i:07d}\n    rate_limit:\n"
            f"      unit: minute\n      requests_per_unit: {i % 1000 + 1}\n"
        )
    return "".join(lines)


@dataclass
class Row:
    descriptors: int
    file_bytes: int
    load_seconds: float
    load_cpu_seconds: float  # CPU time of the load process (its wall time depends on the machine)
    calls_during: int
    slowest_ms: float
    p99_ms: float
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float
    loader_peak_mib: float
    control_slowest_ms: float  # the same callers over as long a time with no reload
    control_p99_ms: float
    missed: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def renice(pid: int, niceness: int) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():  # every thread: niceness is per thread
        os.setpriority(os.PRIO_PROCESS, int(task.name), niceness)


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def serving_pid(outer: int) -> int:
    """The process that serves gRPC and loads the config: on pyvoy (the default) the Envoy the
    ``ratelimit`` process started, with the service embedded; on grpcio the process itself."""
    pending = children(outer)
    while pending:
        pid = pending.pop()
        with contextlib.suppress(OSError):
            if Path(os.readlink(f"/proc/{pid}/exe")).name == "envoy":
                return pid
        pending += children(pid)
    return outer


class Sampler(threading.Thread):
    """RSS of the serving process and peak RSS of any process below it other than the fork
    server's long-lived copy (the load process), every SAMPLE_SECONDS."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.peak = self.loader_peak = 0.0
        self.baseline_children: set[int] = set()

    def reset(self) -> None:
        self.peak = self.loader_peak = 0.0
        self.baseline_children = set(self._descendants())

    def _descendants(self) -> list[int]:
        pending, seen = children(self.pid), []
        while pending:
            pid = pending.pop()
            seen.append(pid)
            pending += children(pid)
        return seen

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_mib(self.pid))
            for pid in self._descendants():
                if pid not in self.baseline_children:
                    self.loader_peak = max(self.loader_peak, rss_mib(pid))


@dataclass
class Calls:
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end), monotonic
    failures: list[str] = field(default_factory=list)


async def caller(port: int, calls: Calls, stop: asyncio.Event) -> None:
    request = rls_pb2.RateLimitRequest(
        domain="bench",
        descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[{"key": "client", "value": "x"}])],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        while not stop.is_set():
            start = time.monotonic()
            try:
                await stub.ShouldRateLimit(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                calls.failures.append(f"{exc.code().name}: {exc.details()}")
            calls.spans.append((start, time.monotonic()))


def overlapping(calls: Calls, began: float, ended: float) -> list[float]:
    """Durations (ms, sorted) of the calls that were in flight at some time in [began, ended]."""
    return sorted(
        (end - start) * 1000 for start, end in calls.spans if end >= began and start <= ended
    )


def slowest_and_p99(durations: list[float]) -> tuple[float, float]:
    if not durations:
        return float("nan"), float("nan")
    return durations[-1], durations[int(len(durations) * 0.99)]


def wait_for_load(service: Process, count: int) -> tuple[float, float]:
    """The duration and the load process's CPU time the service logged for its ``count``-th
    successful load."""
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        text = service.log_text()
        found = re.findall(r"config loaded in ([0-9.]+)s", text)
        cpu = re.findall(r"config load process: ([0-9.]+)s of CPU", text)
        if len(found) >= count and len(cpu) >= count:
            return float(found[count - 1]), float(cpu[count - 1])
        if "Error loading new configuration" in service.log_text():
            raise SystemExit(f"bench_reload: the load failed:\n{service.tail()}")
        time.sleep(0.02)
    raise SystemExit(f"bench_reload: no load within {LOAD_TIMEOUT:g}s:\n{service.tail()}")


async def measure(sizes: list[int], callers: int, workdir: Path) -> list[Row]:
    config_dir = workdir / "config"
    config_dir.mkdir()
    (config_dir / "bench.yaml").write_text(SMALL)
    # Every big file is written before the callers start: making 11 MB of text here would
    # stall this process's own callers, and those slow calls would count against the reload.
    staged = {size: workdir / f"staged-{size}.yaml" for size in sizes}
    for size, path in staged.items():
        path.write_text(big_config(size))
    service = start_service(workdir, config_dir)
    serving = serving_pid(service.process.pid)
    niceness = int(os.environ.get("BENCH_RELOAD_NICE", "0"))
    if niceness:  # the service (and this process) ahead of whatever else the machine runs
        renice(serving, niceness)
        renice(os.getpid(), niceness)
    sampler = Sampler(serving)
    sampler.start()
    calls, stop = Calls(), asyncio.Event()
    tasks = [asyncio.create_task(caller(service.grpc_port, calls, stop)) for _ in range(callers)]
    rows: list[Row] = []
    try:
        await asyncio.to_thread(wait_for_load, service.process, 1)
        await asyncio.sleep(2.0)  # warm up
        for number, size in enumerate(sizes, start=2):
            file_bytes = staged[size].stat().st_size
            rss_before = rss_mib(serving)
            sampler.reset()
            began = time.monotonic()
            os.replace(staged[size], config_dir / "bench.yaml")
            load_seconds, load_cpu = await asyncio.to_thread(
                wait_for_load, service.process, number
            )
            ended = time.monotonic()
            await asyncio.sleep(2.0)  # settle; calls ending in this time still count if slow
            during = overlapping(calls, began, ended)
            # The control: as long again with no reload (the machine's own noise).
            quiet_began = time.monotonic()
            await asyncio.sleep(max(ended - began, 2.0))
            control = overlapping(calls, quiet_began, time.monotonic())
            rows.append(
                Row(
                    descriptors=size,
                    file_bytes=file_bytes,
                    load_seconds=load_seconds,
                    load_cpu_seconds=load_cpu,
                    calls_during=len(during),
                    slowest_ms=slowest_and_p99(during)[0],
                    p99_ms=slowest_and_p99(during)[1],
                    rss_before_mib=rss_before,
                    rss_peak_mib=sampler.peak,
                    rss_after_mib=rss_mib(serving),
                    loader_peak_mib=sampler.loader_peak,
                    control_slowest_ms=slowest_and_p99(control)[0],
                    control_p99_ms=slowest_and_p99(control)[1],
                )
            )
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        sampler.stop.set()
        service.process.stop()
    if calls.failures:
        raise SystemExit(f"bench_reload: {len(calls.failures)} calls failed: {calls.failures[:3]}")
    for row in rows:
        load_target, call_target = TARGETS.get(row.descriptors, (None, None))
        if load_target is not None and row.load_seconds > load_target:
            row.missed.append(f"load {row.load_seconds:.2f}s > {load_target:g}s")
        if call_target is not None and not row.slowest_ms <= call_target:
            row.missed.append(f"slowest call {row.slowest_ms:.0f}ms > {call_target:g}ms")
    return rows


def run(sizes: list[int] | None = None, callers: int = 4) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as workdir:
        return asyncio.run(measure(sizes or [10_000, 100_000], callers, Path(workdir)))


def main() -> int:
    sizes = [int(s) for s in os.environ.get("BENCH_RELOAD_SIZES", "10000,100000").split(",")]
    rows = run(sizes, int(os.environ.get("BENCH_RELOAD_CALLERS", "4")))
    print(f"{'descriptors':>11} {'MB':>5} {'load s':>7} {'CPU s':>6} {'calls':>6} "
          f"{'slowest ms':>10} {'p99 ms':>7} {'no-reload slowest/p99':>21} "
          f"{'RSS MiB before/peak/after':>26} {'loader MiB':>10}")  # fmt: skip
    for r in rows:
        rss = f"{r.rss_before_mib:.0f}/{r.rss_peak_mib:.0f}/{r.rss_after_mib:.0f}"
        verdict = "MISSED: " + "; ".join(r.missed) if r.missed else "ok"
        print(f"{r.descriptors:>11} {r.file_bytes / 1e6:>5.1f} {r.load_seconds:>7.2f} "
              f"{r.load_cpu_seconds:>6.2f} "
              f"{r.calls_during:>6} {r.slowest_ms:>10.1f} {r.p99_ms:>7.1f} "
              f"{f'{r.control_slowest_ms:.1f}/{r.control_p99_ms:.1f}':>21} {rss:>26} "
              f"{r.loader_peak_mib:>10.0f}  {verdict}")  # fmt: skip
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = Path(os.environ.get("BENCH_OUT", ROOT / ".bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "reload.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    missed = any(r.missed for r in rows)
    return 1 if missed and os.environ.get("BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
