"""gRPC TLS and mTLS (GRPC_SERVER_USE_TLS, GRPC_CLIENT_TLS_CACERT, GRPC_CLIENT_TLS_SAN) with
certificates made here by trustme, and the server certificate reloaded when its files change, on
the service process with both gRPC transports (docs/operations.md, docs/transports.md)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from support.redis_fixtures import RedisServer
from support.service_env import ServiceProcess, base_env, write_rules
from test_grpc import RULES as GRPC_RULES
from test_grpc import descriptor

from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit_svc.servers.tls import RELOAD_POLL_SECONDS

TRANSPORTS = ["pyvoy", "grpcio"]
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


def uri_cert(ca: trustme.CA, uri: str) -> tuple[bytes, bytes]:
    """A client certificate whose only SAN is ``uri`` (trustme issues DNS, IP and e-mail ones):
    its PEM chain and key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "uri client")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def credentials(
    ca: trustme.CA | None, client: trustme.LeafCert | tuple[bytes, bytes] | None = None
) -> grpc.ChannelCredentials:
    if isinstance(client, trustme.LeafCert):
        client = (client.cert_chain_pems[0].bytes(), client.private_key_pem.bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes() if ca else None,
        private_key=client[1] if client else None,
        certificate_chain=client[0] if client else None,
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


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_service(env: dict[str, str], transport: str) -> ServiceProcess:
    service = await ServiceProcess.start({**env, "GRPC_SERVER": transport})
    listening = next(line for line in service.lines if "Listening for gRPC" in line)
    assert ("ratelimit_svc.servers.pyvoy" in listening) == (transport == "pyvoy"), service.lines
    return service


@pytest.fixture
async def tls_service(
    tmp_path: Path, pki: Pki, transport: str, request: pytest.FixtureRequest
) -> AsyncIterator[ServiceProcess]:
    extra: dict[str, str] = getattr(request, "param", {})
    env = base_env(**write_rules(tmp_path, GRPC_RULES), GRPC_SERVER_USE_TLS="true", **pki.server_files())
    if extra.get("mtls"):
        env["GRPC_CLIENT_TLS_CACERT"] = pki.client_ca_file()
    if extra.get("san"):
        env["GRPC_CLIENT_TLS_SAN"] = extra["san"]
    service = await start_service(env, transport)
    try:
        yield service
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait() == 0
    finally:
        await service.kill()


def port_of(service: ServiceProcess) -> int:
    return service.ports["gRPC"]


async def served_with(port: int, creds: grpc.ChannelCredentials) -> rls_pb2.RateLimitResponse:
    """A call that succeeds once a rotated certificate is served: at the next handshake on
    grpcio, once Envoy has read the files again on pyvoy (within RELOAD_POLL_SECONDS)."""
    async with asyncio.timeout(10 * RELOAD_POLL_SECONDS):
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                return await call(port, creds)
            await asyncio.sleep(0.05)


async def test_tls_answers_a_client_that_trusts_the_ca(tls_service: ServiceProcess, pki: Pki) -> None:
    response = await call(port_of(tls_service), credentials(pki.server_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


async def test_tls_refuses_a_plaintext_client(tls_service: ServiceProcess) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), None)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_tls_refused_by_a_client_that_does_not_trust_the_ca(tls_service: ServiceProcess) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), credentials(trustme.CA()))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_service", [{"mtls": "1"}], indirect=True)
async def test_mtls_requires_a_client_certificate(tls_service: ServiceProcess, pki: Pki) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), credentials(pki.server_ca))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # a certificate from another CA is refused too
    stranger = trustme.CA().issue_cert("client.example")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), credentials(pki.server_ca, stranger))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # one signed by GRPC_CLIENT_TLS_CACERT is accepted
    client = pki.client_ca.issue_cert("client.example")
    response = await call(port_of(tls_service), credentials(pki.server_ca, client))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("tls_service", [{"mtls": "1", "san": "client.example"}], indirect=True)
async def test_mtls_san_must_match(tls_service: ServiceProcess, pki: Pki) -> None:
    wrong = pki.client_ca.issue_cert("other.example")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), credentials(pki.server_ca, wrong))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "client.example" in (caught.value.details() or "")
    right = pki.client_ca.issue_cert("other.example", "client.example")
    response = await call(port_of(tls_service), credentials(pki.server_ca, right))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("tls_service", [{"mtls": "1", "san": "spiffe://cluster.local/ns/a/sa/b"}], indirect=True)
async def test_mtls_san_may_be_a_uri(tls_service: ServiceProcess, pki: Pki) -> None:
    wrong = uri_cert(pki.client_ca, "spiffe://cluster.local/ns/a/sa/other")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port_of(tls_service), credentials(pki.server_ca, wrong))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    right = uri_cert(pki.client_ca, "spiffe://cluster.local/ns/a/sa/b")
    response = await call(port_of(tls_service), credentials(pki.server_ca, right))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


@pytest.mark.parametrize("tls_service", [{"mtls": "1", "san": "client.example"}], indirect=True)
async def test_a_client_cannot_claim_the_san_in_a_header(tls_service: ServiceProcess, pki: Pki) -> None:
    """pyvoy reads the SANs from the header Envoy sets (docs/transports.md): a client's own is
    replaced, never believed."""
    wrong = pki.client_ca.issue_cert("other.example")
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    creds = credentials(pki.server_ca, wrong)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port_of(tls_service)}", creds, options=options) as channel:
        for claim in ("DNS=client.example", 'By=x;URI="a";DNS=client.example', "DNS=client.example,DNS=x"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
                    REQUEST, timeout=5, metadata=[("x-forwarded-client-cert", claim)]
                )
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, claim


@pytest.mark.parametrize("tls_service", [{"mtls": "1", "san": "client.example"}], indirect=True)
async def test_san_check_covers_the_health_service(tls_service: ServiceProcess, pki: Pki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    wrong = pki.client_ca.issue_cert("other.example")
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    creds = credentials(pki.server_ca, wrong)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port_of(tls_service)}", creds, options=options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("rename", [True, False], ids=["renamed-over", "written-in-place"])
async def test_rotated_certificate_is_served_to_new_connections(
    tls_service: ServiceProcess, pki: Pki, rename: bool
) -> None:
    port = port_of(tls_service)
    new_ca = trustme.CA()
    with pytest.raises(grpc.aio.AioRpcError):
        await call(port, credentials(new_ca))  # not yet
    cert = new_ca.issue_cert("localhost")
    if rename:  # the way a secret volume does it: new files renamed over the old ones
        (pki.dir / "server.pem.new").write_bytes(cert.cert_chain_pems[0].bytes())
        (pki.dir / "server.key.new").write_bytes(cert.private_key_pem.bytes())
        os.replace(pki.dir / "server.key.new", pki.dir / "server.key")
        os.replace(pki.dir / "server.pem.new", pki.dir / "server.pem")
    else:
        (pki.dir / "server.key").write_bytes(cert.private_key_pem.bytes())
        (pki.dir / "server.pem").write_bytes(cert.cert_chain_pems[0].bytes())
    response = await served_with(port, credentials(new_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    with pytest.raises(grpc.aio.AioRpcError):
        await call(port, credentials(pki.server_ca))  # the old certificate is gone


async def test_a_broken_rotation_keeps_the_current_certificate(tls_service: ServiceProcess, pki: Pki) -> None:
    (pki.dir / "server.pem").write_bytes(b"half a certificate")
    response = await call(port_of(tls_service), credentials(pki.server_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK
    line = await tls_service.wait_for_line("keeping the current certificate")
    assert "server.pem" in line
    response = await call(port_of(tls_service), credentials(pki.server_ca))
    assert response.overall_code == rls_pb2.RateLimitResponse.OK


async def test_tls_with_workers(tmp_path: Path, pki: Pki, transport: str, redis_db: RedisServer) -> None:
    """WORKERS=2: every process serving gRPC serves TLS (pyvoy: each Envoy worker has its own
    SDS files and reloads them)."""
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES), **pki.server_files(), GRPC_SERVER_USE_TLS="true",
        GRPC_SERVER=transport, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url,
        WORKERS="2", LOG_LEVEL="INFO",
    )  # fmt: skip
    service = await ServiceProcess.start(env)
    try:
        if not any("gRPC workers:" in line for line in service.lines):
            await service.wait_for_line("gRPC workers:")
        for _ in range(8):  # new connections, spread over the workers by the kernel; answered
            # (2 a minute, counted in the one Redis: OK, then OVER_LIMIT)
            response = await call(port_of(service), credentials(pki.server_ca))
            assert len(response.statuses) == 1
        new_ca = trustme.CA()
        cert = new_ca.issue_cert("localhost")
        (pki.dir / "server.key").write_bytes(cert.private_key_pem.bytes())
        (pki.dir / "server.pem").write_bytes(cert.cert_chain_pems[0].bytes())
        # Every worker serves the new certificate: 16 new connections in a row get it (were one
        # worker left on the old one, 16 in a row would all miss it once in 2**16).
        async with asyncio.timeout(10 * RELOAD_POLL_SECONDS):
            streak = 0
            while streak < 16:
                try:
                    await call(port_of(service), credentials(new_ca))
                    streak += 1
                except grpc.aio.AioRpcError:
                    streak = 0
                    await asyncio.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait() == 0
    finally:
        await service.kill()


async def test_missing_certificate_stops_startup(tmp_path: Path, transport: str) -> None:
    env = base_env(
        **write_rules(tmp_path, GRPC_RULES),
        GRPC_SERVER=transport,
        GRPC_SERVER_USE_TLS="true",
        GRPC_SERVER_TLS_CERT=str(tmp_path / "nope.pem"),
        GRPC_SERVER_TLS_KEY=str(tmp_path / "nope.key"),
    )
    service = await ServiceProcess.spawn(env)
    assert await service.wait() == 1
    log = "".join(service.lines)
    assert "gRPC TLS: cannot load the server certificate" in log and "nope.pem" in log, log
    assert "Traceback" not in log and "using grpcio instead" not in log, log
