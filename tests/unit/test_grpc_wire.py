"""The pure parts of the gRPC transports (docs/transports.md): gRPC-over-ASGI framing, timeouts and
message encoding, and the Envoy bootstrap, log lines and client-certificate header of the pyvoy
transport."""

from __future__ import annotations

import gzip
import json
import logging
import struct

import pytest

from ratelimit_svc.servers import envoy_bootstrap
from ratelimit_svc.servers.envoy_log import log_record
from ratelimit_svc.servers.grpc_asgi import Messages, encode_grpc_message, parse_grpc_timeout
from ratelimit_svc.servers.tls import SdsFiles, forwarded_sans
from ratelimit_svc.service import RpcError, Status
from ratelimit_svc.settings.model import Settings


def framed(message: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(message)) + message


@pytest.mark.parametrize("size", [1, 2, 4, 5, 6, 7, 100])
def test_messages_reassemble_from_chunks_of_any_size(size: int) -> None:
    data = framed(b"first") + framed(b"") + framed(b"third message")
    messages = Messages(max_bytes=1024, encoding=None)
    found = []
    for start in range(0, len(data), size):
        found += messages.feed(data[start : start + size])
    messages.finish()
    assert found == [b"first", b"", b"third message"]


def test_a_message_cut_short_is_an_error() -> None:
    messages = Messages(max_bytes=1024, encoding=None)
    assert messages.feed(framed(b"complete")[:-1]) == []
    with pytest.raises(RpcError) as error:
        messages.finish()
    assert error.value.code == Status.INTERNAL


def test_a_message_over_the_limit_is_refused_from_its_prefix() -> None:
    messages = Messages(max_bytes=10, encoding=None)
    with pytest.raises(RpcError) as error:
        messages.feed(struct.pack(">BI", 0, 11))  # the body need not arrive
    assert error.value.code == Status.RESOURCE_EXHAUSTED
    assert "11 vs. 10" in error.value.message


def test_gzip_messages_are_decompressed_and_bounded() -> None:
    messages = Messages(max_bytes=1000, encoding=b"gzip")
    assert messages.feed(framed(gzip.compress(b"hello"), compressed=True)) == [b"hello"]
    bomb = gzip.compress(b"\0" * 100_000)  # small on the wire, too big once decompressed
    with pytest.raises(RpcError) as error:
        Messages(max_bytes=1000, encoding=b"gzip").feed(framed(bomb, compressed=True))
    assert error.value.code == Status.RESOURCE_EXHAUSTED
    with pytest.raises(RpcError) as flagged:
        Messages(max_bytes=1000, encoding=None).feed(framed(b"x", compressed=True))
    assert flagged.value.code == Status.INTERNAL


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"20m", 0.02), (b"5u", 5e-6), (b"7n", 7e-9), (b"2M", 120.0), (b"1H", 3600.0),
     (b"99999999m", 99999.999)],
)
def test_grpc_timeout(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"1", b"1s", b"-1S", b"123456789S", b"1.5S"])
def test_malformed_grpc_timeout(value: bytes) -> None:
    with pytest.raises(ValueError, match="malformed grpc-timeout"):
        parse_grpc_timeout(value)


def test_envoy_config_carries_the_grpc_settings() -> None:
    settings = Settings.from_env({"GRPC_PORT": "9999", "GRPC_MAX_CONNECTION_AGE": "90s", "GRPC_MAX_CONNECTION_AGE_GRACE": "5s"})
    text = json.dumps(envoy_bootstrap.envoy_config(settings, "/tmp/admin.sock"))
    config = json.loads(text)
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 9999
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["common_http_protocol_options"]["max_connection_duration"] == "90.000s"
    assert manager["drain_timeout"] == "5.000s"
    assert manager["codec_type"] == "HTTP2"
    uds = envoy_bootstrap.envoy_config(Settings.from_env({"GRPC_UDS": "/run/rl.sock"}), "/tmp/a")
    assert uds["static_resources"]["listeners"][0]["address"] == {"pipe": {"path": "/run/rl.sock"}}
    assert "transport_socket" not in listener["filter_chains"][0]
    # Whatever a client sends as x-forwarded-client-cert is replaced (the SAN check reads it).
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"
    assert manager["set_current_client_cert_details"] == {"dns": True, "uri": True}


@pytest.mark.parametrize("client_ca", ["", "/certs/ca.pem"])
def test_envoy_config_with_tls_reads_the_sds_files(client_ca: str) -> None:
    settings = Settings.from_env({
        "GRPC_SERVER_USE_TLS": "true", "GRPC_SERVER_TLS_CERT": "/certs/tls.crt",
        "GRPC_SERVER_TLS_KEY": "/certs/tls.key", "GRPC_CLIENT_TLS_CACERT": client_ca,
    })  # fmt: skip
    secrets = SdsFiles(settings.grpc_tls, "/run/private")
    config = envoy_bootstrap.envoy_config(settings, "/tmp/admin.sock", secrets=secrets)
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    context = chain["transport_socket"]["typed_config"]
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    [server] = common["tls_certificate_sds_secret_configs"]
    assert server["sds_config"]["path_config_source"]["path"] == "/run/private/server-secret.json"
    if client_ca:
        assert context["require_client_certificate"] is True
        validation = common["validation_context_sds_secret_config"]
        assert validation["sds_config"]["path_config_source"]["path"] == "/run/private/client-ca-secret.json"
    else:
        assert "require_client_certificate" not in context
        assert "validation_context_sds_secret_config" not in common
    assert config["node"]["id"]  # SDS subscriptions need one


@pytest.mark.parametrize(
    ("header", "names"),
    [
        (b"Hash=ab12;DNS=client.example;DNS=other.example", {"client.example", "other.example"}),
        (b"Hash=ab12;URI=spiffe://cluster.local/ns/a/sa/b;DNS=x", {"spiffe://cluster.local/ns/a/sa/b", "x"}),
        (b'Hash=ab;URI="spiffe://a/b;c=d";DNS=x', {"spiffe://a/b;c=d", "x"}),
        (b"Hash=ab;DNS=first,By=spiffe://x;DNS=second", {"first"}),  # the first element only
        (b'Subject="CN=client.example,O=x";Hash=ab', set()),  # a subject is not a SAN
        (b"", set()),
    ],
)
def test_forwarded_sans(header: bytes, names: set[str]) -> None:
    assert forwarded_sans(header) == names





@pytest.mark.parametrize(
    ("message", "wire"),
    [("plain text", b"plain text"), ("100%", b"100%25"), ("é\n", b"%C3%A9%0A"), ("", b"")],
)
def test_grpc_message_percent_encoding(message: str, wire: bytes) -> None:
    assert encode_grpc_message(message) == wire


@pytest.mark.parametrize(
    ("line", "name", "level", "message"),
    [
        ("debug main starting worker: 0\n", "envoy.main", logging.DEBUG, "starting worker: 0"),
        ("warning config a  spaced\\nmessage", "envoy.config", logging.WARNING, "a  spaced\\nmessage"),
        ("critical backtrace Caught Segmentation fault", "envoy.backtrace", logging.CRITICAL, "Caught Segmentation fault"),
        ("trace http [C1] x", "envoy.http", logging.DEBUG, "[C1] x"),
        ("odd", "envoy.envoy", logging.WARNING, ""),
    ],
)
def test_envoy_log_lines_become_records(
    caplog: pytest.LogCaptureFixture, line: str, name: str, level: int, message: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        log_record(line)
    [record] = caplog.records
    assert (record.name, record.levelno, record.getMessage()) == (name, level, message)
