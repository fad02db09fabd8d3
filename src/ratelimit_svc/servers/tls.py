"""gRPC server TLS and mTLS (GRPC_SERVER_USE_TLS, GRPC_SERVER_TLS_*, GRPC_CLIENT_TLS_*) on both
transports (docs/operations.md (gRPC TLS and mTLS), docs/transports.md): certificate files re-read
when they change, handed to Envoy as SDS files (``SdsFiles``) or to grpcio (``tls_grpc.py``, kept
apart so that pyvoy's processes never import grpc), and the client certificate's SAN check on
pyvoy (``forwarded_sans`` of the header Envoy sets).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import threading
from typing import Any

from ratelimit_svc.errors import SettingsError
from ratelimit_svc.settings.model import GrpcTlsSettings

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


Pems = tuple[bytes, bytes, bytes | None]  # certificate chain, key, client CA (mTLS)


class CertificateFiles:
    """The server's key, certificate chain and (for mTLS) client CA, as files on disk."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._stamp: _Stamp = ()
        self._refused: _Stamp = ()  # an unusable set, logged once
        self.loads = 0

    @classmethod
    def of(cls, settings: GrpcTlsSettings) -> CertificateFiles:
        if not settings.server_tls_cert or not settings.server_tls_key:
            raise SettingsError(
                "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY"
            )
        return cls(settings.server_tls_cert, settings.server_tls_key, settings.client_tls_cacert)

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key, self.client_ca) if self.client_ca else (self.cert, self.key)

    def _current_stamp(self) -> _Stamp:
        stamps = []
        for path in self.paths():
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def load(self) -> Pems:
        """Read the files now; raises OSError or ValueError when they are unusable."""
        with self._lock:
            stamp = self._current_stamp()
            pems = self._read()
            self._stamp = stamp
            self.loads += 1
            return pems

    def first_load(self) -> Pems:
        """``load`` at startup: unusable files stop the service (SettingsError)."""
        try:
            return self.load()
        except (OSError, ValueError) as exc:
            raise SettingsError(f"gRPC TLS: cannot load the server certificate: {exc}") from None

    def _read(self) -> Pems:
        with open(self.cert, "rb") as f:
            chain = f.read()
        with open(self.key, "rb") as f:
            key = f.read()
        if b"-----BEGIN" not in chain or b"-----BEGIN" not in key:
            raise ValueError("not a PEM certificate and key")
        root = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                root = f.read()
            if b"-----BEGIN" not in root:
                raise ValueError(f"{self.client_ca}: not a PEM certificate")
        return chain, key, root

    def reload(self) -> Pems | None:
        """The files, when they changed since the last load and are usable; otherwise None (an
        unusable set keeps the current certificate, and says why once)."""
        try:
            stamp = self._current_stamp()
            if stamp in (self._stamp, self._refused):
                return None
            pems = self.load()
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                self._refused = self._current_stamp()
            log.error(
                "gRPC TLS: keeping the current certificate: cannot load %s: %s",
                ", ".join(self.paths()),
                exc,
            )
            return None
        log.warning("gRPC TLS: loaded a new server certificate from %s", self.cert)
        return pems


def san_refusal(san: str) -> str:
    """The UNAUTHENTICATED message for a client certificate without the SAN (both transports)."""
    return f"client certificate does not carry the subject alternative name {san!r}"


# One key=value of Envoy's x-forwarded-client-cert; a value with ,;= in it is quoted.
_XFCC_PAIR = re.compile(r'([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,]*)([;,]?)')


@functools.lru_cache(maxsize=256)  # the same header on every call of a connection
def forwarded_sans(header: bytes) -> frozenset[str]:
    """The DNS and URI SANs of the client certificate in Envoy's ``x-forwarded-client-cert``
    (its first element: Envoy sets the header for this connection, docs/transports.md)."""
    text = header.decode("utf-8", "replace")
    names = set()
    position = 0
    while match := _XFCC_PAIR.match(text, position):
        key, value, separator = match.groups()
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"')
        if key in ("DNS", "URI"):
            names.add(value)
        if separator != ";":
            break
        position = match.end()
    return frozenset(names)


SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
RELOAD_POLL_SECONDS = 1.0  # pyvoy: how soon an in-place edit of the files is noticed


class SdsFiles:
    """The pyvoy transport's certificate: SDS files in ``directory`` (private to the service)
    holding the loaded certificate, key and client CA, which Envoy's listener reads again each
    time one is replaced. ``write`` puts what ``CertificateFiles`` loaded last; ``watch`` does it
    whenever the files change and load, so Envoy serves what grpcio's fetcher would."""

    def __init__(self, settings: GrpcTlsSettings, directory: str) -> None:
        self.files = CertificateFiles.of(settings)
        self.server = os.path.join(directory, "server-secret.json")
        self.client_ca = os.path.join(directory, "client-ca-secret.json")

    def write(self, pems: Pems) -> None:
        """Replace the SDS files, each in one rename (what Envoy watches for)."""
        chain, key, root = pems
        cert = {
            "certificate_chain": {"inline_string": chain.decode("ascii", "replace")},
            "private_key": {"inline_string": key.decode("ascii", "replace")},
        }
        self._replace(self.server, {"name": "server", "tls_certificate": cert})
        if root is not None:
            ca = {"trusted_ca": {"inline_string": root.decode("ascii", "replace")}}
            self._replace(self.client_ca, {"name": "client_ca", "validation_context": ca})

    @staticmethod
    def _replace(path: str, secret: dict[str, Any]) -> None:
        answer = {"resources": [{"@type": SECRET_TYPE, **secret}]}
        descriptor = os.open(f"{path}.new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as f:
            json.dump(answer, f)
        os.replace(f"{path}.new", path)

    async def watch(self, interval: float = RELOAD_POLL_SECONDS) -> None:
        """Until cancelled: the files that loaded last are what Envoy serves."""
        with contextlib.suppress(OSError, ValueError):
            self.files.load()  # as written at startup, by the process that started Envoy
        while True:
            await asyncio.sleep(interval)
            if (pems := self.files.reload()) is not None:
                self.write(pems)
