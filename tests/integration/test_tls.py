"""gRPC TLS and mTLS (GRPC_SERVER_USE_TLS, GRPC_CLIENT_TLS_CACERT, GRPC_CLIENT_TLS_SAN) with
certificates made here by trustme, and the server certificate reloaded when its files change."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from support.service_env import base_env, write_rules
from test_grpc import RULES as GRPC_RULES
from test_grpc import descriptor

from ratelimit_svc.app import App
from ratelimit_svc.errors import SettingsError
from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.settings.model import Settings

REQUEST = rls_pb2.RateLimitRequest(domain="basic", descriptors=[descriptor(("key1", "tls"))])


@dataclass
class Pki:
    server_ca: trustme.CA
    client_ca: trustme.CA
    dir: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def server_files(self, ca: trustme.CA | None = None) -> dict[str, str]:
        cert = (ca or self.server_ca).issue_cert("localhost", "127.0.0.1")
        return {
            "GRPC_SERVER_TLS_CERT": self.write("server.pem", cert.cert_chain_pems[0].bytes()),
            "GRPC_SERVER_TLS_KEY": self.write("server.key", cert.private_key_pem.bytes()),
        }

    def client_ca_file(self) -> str:
        return self.write("client-ca.pem", self.client_ca.cert_pem.bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    certs = tmp_path / "certs"
    certs.mkdir()
    return Pki(trustme.CA(), trustme.CA(), certs)


def credentials(
    ca: trustme.CA | None, client: trustme.LeafCert | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes() if ca else None,
        private_key=client.private_key_pem.bytes() if client else None,
        certificate_chain=client.cert_chain_pems[0].bytes() if client else None,
    )


async def call(port: int, creds: grpc.ChannelCredentials | None) -> rls_pb2.RateLimitResponse:
    # A private subchannel pool: every call here is a new connection and a new handshake.
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.secure_channel(target, creds, options=options)
        if creds is not None
        else grpc.aio.insecure_channel(target, options=options)
    )
    async with channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        return await stub.ShouldRateLimit(REQUEST, timeout=5)


@pytest.fixture
async def tls_app(tmp_path: Path, pki: Pki, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    extra: dict[str, str] = getattr(request, "param", {})
    env = base_env(**write_rules(tmp_path, GRPC_RULES), GRPC_SERVER_USE_TLS="true", **pki.server_files())
    if extra.get("mtls"):
        env["GRPC_CLIENT_TLS_CACERT"] = pki.client_ca_file()
    if extra.get("san"):
        env["GRPC_CLIENT_TLS_SAN"] = extra["san"]
    async with App(Settings.from_env(env)) as app:
        yield app


def port_of(app: App) -> int:
    assert app.grpc is not None
    return app.grpc.port


async def test_tls_answers_a_client_that_trusts_the_ca(tls_app: App, pki: Pki) -> None:
    response = await call(port_of(tls_app), credentials(pki.server_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


async def test_tls_refuses_a_plaintext_client(tls_app: App) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_app), None)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_tls_refused_by_a_client_that_does_not_trust_the_ca(tls_app: App) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_app), credentials(trustme.CA()))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_app", [{"mtls": "1"}], indirect=True)
async def test_mtls_requires_a_client_certificate(tls_app: App, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_app), credentials(pki.server_ca))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA is refused too
    stranger = trustme.CA().issue_cert("client.example")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_app), credentials(pki.server_ca, stranger))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # one signed by GRPC_CLIENT_TLS_CACERT is accepted
    client = pki.client_ca.issue_cert("client.example")
    response = await call(port_of(tls_app), credentials(pki.server_ca, client))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("tls_app", [{"mtls": "1", "san": "client.example"}], indirect=True)
async def test_mtls_san_must_match(tls_app: App, pki: Pki) -> None:
    wrong = pki.client_ca.issue_cert("other.example")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_app), credentials(pki.server_ca, wrong))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "client.example" in (caught.value.details() or "")
    right = pki.client_ca.issue_cert("other.example", "client.example")
    response = await call(port_of(tls_app), credentials(pki.server_ca, right))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("tls_app", [{"mtls": "1", "san": "client.example"}], indirect=True)
async def test_san_check_covers_the_health_service(tls_app: App, pki: Pki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    wrong = pki.client_ca.issue_cert("other.example")
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    creds = credentials(pki.server_ca, wrong)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port_of(tls_app)}", creds, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_rotated_certificate_is_served_to_new_connections(tls_app: App, pki: Pki) -> None:
    port = port_of(tls_app)
    new_ca = trustme.CA()
    with pytest.raises(grpc.aio.AioRpcError):
        await call(port, credentials(new_ca))  # not yet
    # Rotate the way a secret volume does: write new files, rename them over the old ones.
    cert = new_ca.issue_cert("localhost")
    (pki.dir / "server.pem.new").write_bytes(cert.cert_chain_pems[0].bytes())
    (pki.dir / "server.key.new").write_bytes(cert.private_key_pem.bytes())
    os.replace(pki.dir / "server.key.new", pki.dir / "server.key")
    os.replace(pki.dir / "server.pem.new", pki.dir / "server.pem")
    response = await call(port, credentials(new_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    with pytest.raises(grpc.aio.AioRpcError):
        await call(port, credentials(pki.server_ca))  # the old certificate is gone


async def test_a_broken_rotation_keeps_the_current_certificate(tls_app: App, pki: Pki) -> None:
    (pki.dir / "server.pem").write_bytes(b"half a certificate")
    response = await call(port_of(tls_app), credentials(pki.server_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


async def test_missing_certificate_stops_startup(tmp_path: Path) -> None:
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        GRPC_SERVER_USE_TLS="true",
        GRPC_SERVER_TLS_CERT=str(tmp_path / "nope.pem"),
        GRPC_SERVER_TLS_KEY=str(tmp_path / "nope.key"),
    )
    with pytest.raises(SettingsError, match=r"nope\.pem"):
        async with App(Settings.from_env(env)):
            pass
