"""Plain HTTP through Envoy, the demo's identity function, and window alignment for exact counts."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def limited(self) -> bool:
        return self.status == 429 and self.headers.get("x-envoy-ratelimited") == "true"


def request(
    port: int,
    path: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    source: str | None = None,
) -> Reply:
    """One request on a fresh connection (from loopback address ``source`` when given)."""
    sent = dict(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(
        LOOPBACK, port, timeout=10, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=sent)
        response = conn.getresponse()
        body = response.read()
        received: dict[str, str] = {}
        for name, value in response.getheaders():
            name = name.lower()
            received[name] = f"{received[name]}, {value}" if name in received else value
        return Reply(response.status, received, body)
    finally:
        conn.close()


def fnv1a32(text: str) -> str:
    """What envoy/identity.lua computes, so tests can predict the client id of a token."""
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{h:08x}"


def client_id(token: str) -> str:
    return f"client-{fnv1a32(token)}"


def fresh_window(length: int, need: float) -> None:
    """Make sure the next ``need`` seconds fall in one rate-limit window of ``length`` seconds.

    Windows are aligned to the Unix epoch and the service reads the same clock, so when less than
    ``need`` seconds are left in the current window we wait for the next one: a burst that must
    see exact counts never straddles a reset.
    """
    left = length - time.time() % length
    if left < need:
        time.sleep(left + 0.02)
