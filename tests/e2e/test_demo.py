"""`make demo` as a user runs it: scripts/demo.py --detach prints the table and leaves the stack
running, `scripts/demo.py down` stops all of it. Ports and the working directory are the test's own
(DEMO_* and DEMO_DIR), so a developer's running demo is not disturbed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import demo

from .client import request

SCRIPT = Path(demo.__file__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rows(output: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(route, client) -> (sent, allowed, limited) from the printed table."""
    table: dict[tuple[str, str], tuple[int, int, int]] = {}
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("route "))
    columns = [len(part) for part in lines[header + 1].split("  ")]
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        cells, position = [], 0
        for width in columns:
            cells.append(line[position : position + width].strip())
            position += width + 2
        table[(cells[0], cells[1])] = (int(cells[2]), int(cells[3]), int(cells[4]))
    return table


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or bool(cmdline.read_bytes())  # a zombie has none


def test_demo_prints_allowed_and_limited_traffic_then_stops(tmp_path: Path) -> None:
    ports = {variable: str(free_port()) for variable in demo.PORTS}
    env = {**os.environ, **ports, "DEMO_DIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            env=env, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip

    children: list[int] = []
    started = run("--detach")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        table = rows(started.stdout)
        assert table[("/api/items", "alice")] == (5, 2, 3)
        assert table[("/api/items", "bob")] == (5, 2, 3)
        assert table[("/reports (csv)", "alice")] == (4, 2, 2)
        assert table[("/reports (json)", "alice")] == (4, 4, 0)
        assert table[("/expensive", "alice")] == (2, 2, 0)
        assert table[("/expensive", "bob")] == (3, 1, 2)
        assert table[("/ip", "from 127.0.0.1")] == (4, 3, 1)
        assert table[("/ip", "from 127.0.0.2")] == (4, 3, 1)
        assert table[("/shadow", "anonymous")] == (4, 4, 0)
        assert table[("/orders", "alice (free)")] == (4, 2, 2)
        assert table[("/orders", "carol (premium)")] == (6, 5, 1)
        assert table[("/quota", "anonymous")] == (6, 3, 3)
        assert table[("/static/logo.png", "anonymous")] == (10, 10, 0)
        assert "Bearer alice          -> client-872213e7 (plan free)" in started.stdout
        # Still running after the table, on the fixed port it was given.
        assert request(int(ports["DEMO_ENVOY_PORT"]), "/").status == 200
        # The console's URL is printed, and it serves the demo's rules and backend.
        console = f"http://127.0.0.1:{ports['DEMO_DEBUG_PORT']}/console"
        assert console in started.stdout
        with urllib.request.urlopen(console, timeout=10) as reply:
            assert 'id="rules-tree"' in reply.read().decode()
        with urllib.request.urlopen(f"{console}/api/rules", timeout=10) as reply:
            domains = [d["domain"] for d in json.load(reply)["domains"]]
        assert "mydomain" in domains
        with urllib.request.urlopen(f"{console}/api/backend", timeout=10) as reply:
            backend = json.load(reply)
        assert backend["type"] == "redis" and backend["healthy"]
        children = [
            int(line.split()[0]) for line in (tmp_path / "children").read_text().splitlines()
        ]
        assert len(children) == 4
    finally:
        stopped = run("down")
    assert stopped.returncode == 0 and "demo: stopped" in stopped.stdout, stopped.stderr
    assert not (tmp_path / "demo.pid").exists()
    assert not any(alive(pid) for pid in children)
