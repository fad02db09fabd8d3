"""The demo's upstream: a tiny HTTP service behind Envoy that echoes what it received as JSON.

Standard library only, so the docker-compose stack runs it on a bare python image. The echo shows
what Envoy forwarded, in particular the identity headers the Lua filter set
(``x-ext-auth-ratelimit``, ``x-ext-auth-plan``) and the rate-limit service's request headers.

    python scripts/upstream.py [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "demo-upstream"
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's connection pool expects
    disable_nagle_algorithm = True  # headers and body are two writes: do not hold the second

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "client": self.headers.get("x-ext-auth-ratelimit"),
                    "plan": self.headers.get("x-ext-auth-plan"),
                    "headers": {name.lower(): value for name, value in self.headers.items()},
                },
                indent=2,
            ).encode()
            + b"\n"
        )
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _echo

    def log_message(self, format: str, *args: object) -> None:
        pass  # Envoy's access log already shows every request


def make_server(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound server (port 0: any free port, see ``server_address``); call serve_forever()."""
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Echo upstream for the Envoy demo.")
    parser.add_argument("--host", default=os.environ.get("UPSTREAM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("UPSTREAM_PORT", "8000")))
    args = parser.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # as PID 1 in a container, SIGTERM has no default action

    signal.signal(signal.SIGTERM, stop)
    with make_server(args.host, args.port) as server:
        host, port = server.server_address[:2]
        print(f"upstream listening on {host}:{port}", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
