"""Rate-limit config over xDS (CONFIG_TYPE=GRPC_XDS_SOTW): a state-of-the-world ADS client.

``XdsConfigClient`` keeps one wildcard subscription to resources of type ``TYPE_URL`` on Envoy's
aggregated discovery service, reconnecting with exponential backoff whenever the stream breaks.
Every response is the complete set of rules: each RateLimitConfig resource is one config document
named after the resource, read straight into the rule model through the checks a file goes through
(so error texts and MERGE_DOMAIN_CONFIG are the file loader's), all are loaded together, and the
result is either reported to the App (the ``ConfigSink`` of config/source.py) and ACKed, or
reported as an error and NACKed with its text while the last accepted config stays in effect.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message
from google.protobuf.struct_pb2 import Struct

from ratelimit_svc import __version__
from ratelimit_svc.config.build import (
    Builder,
    ParsedDescriptor,
    ParsedLimit,
    fixed_windows_only,
)
from ratelimit_svc.config.load_process import build_in_child
from ratelimit_svc.config.rules import Node, RateLimitConfig
from ratelimit_svc.config.source import ConfigSink
from ratelimit_svc.errors import ConfigError, SettingsError
from ratelimit_svc.pb.envoy.config.core.v3 import base_pb2
from ratelimit_svc.pb.envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from ratelimit_svc.pb.ratelimit.config.ratelimit.v3 import rls_conf_pb2
from ratelimit_svc.pb.ratelimit.deps.google.rpc import status_pb2
from ratelimit_svc.settings.model import Settings

log = logging.getLogger(__name__)

TYPE_URL = "type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig"
# The whole rule set arrives in one message; gRPC's default 4 MiB limit is too small for big ones.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_INVALID_ARGUMENT = 3  # google.rpc.Code, as Envoy sets it on a rejected update
_MAX_DOUBLINGS = 60  # 2**60 intervals is already past any max interval
# A response with more resource bytes than this (about 200 descriptors) is built in a child
# process; a smaller one builds here in a few milliseconds, quicker than starting the child.
OFFLOOP_BYTES = 8 * 1024


# -- resources → config ------------------------------------------------------------------------


def load_resources(
    resources: Sequence[Any], *, merge_domains: bool = False, fixed_windows_only: str = ""
) -> RateLimitConfig:
    """Validate and build the config from one response's resources (``google.protobuf.Any``):
    each RateLimitConfig message is read straight into the rule model, through the same checks
    as a file (config/build.py); errors point at the path in the resource."""
    domains: dict[str, Node] = {}
    for index, resource in enumerate(resources):
        config = _decode(index, resource)
        name = config.name or f"<xDS resource {index}>"
        builder = Builder(
            name, domains, merge_domains, _locate, fixed_windows_only=fixed_windows_only
        )
        descriptors = [
            _descriptor(d, f"descriptors[{i}]") for i, d in enumerate(config.descriptors)
        ]
        builder.add_domain(config.domain, descriptors)
    return RateLimitConfig(domains=domains)


def _locate(node: Any, path: str) -> str:
    return f" ({path})" if path else ""


def _decode(index: int, resource: Any) -> Any:
    if resource.type_url.rpartition("/")[2] != TYPE_URL.rpartition("/")[2]:
        raise ConfigError(
            f"xDS resource {index}: type '{resource.type_url}' is not '{TYPE_URL}'"
        )
    config = rls_conf_pb2.RateLimitConfig()
    try:
        config.ParseFromString(resource.value)
    except message.DecodeError as exc:
        raise ConfigError(f"xDS resource {index}: cannot decode RateLimitConfig: {exc}") from None
    return config


def _descriptor(d: Any, path: str) -> ParsedDescriptor:
    return ParsedDescriptor(
        node=None,
        path=path,
        key=d.key,
        value=d.value,
        rate_limit=_limit(d.rate_limit) if d.HasField("rate_limit") else None,
        # docs/algorithms.md: with additional_limits, rate_limit is the first of a list.
        more_limits=(
            [_limit(p, in_list=True) for p in d.additional_limits]
            if d.HasField("rate_limit")
            else []
        ),
        charge_only_when_admitted=d.charge_only_when_admitted,
        shadow_mode=d.shadow_mode,
        quota_mode=d.quota_mode,
        detailed_metric=d.detailed_metric,
        value_to_metric=False,
        share_threshold=False,
        metadata=json_format.MessageToDict(d.metadata) if d.HasField("metadata") else None,
        children=[
            _descriptor(child, f"{path}.descriptors[{i}]")
            for i, child in enumerate(d.descriptors)
        ],
    )


def _limit(policy: Any, *, in_list: bool = False) -> ParsedLimit:
    # As the reference: the enum's name (UNKNOWN when unset, so "invalid rate limit unit
    # 'UNKNOWN'"), or its number when the control plane sends one this proto does not name.
    try:
        unit = rls_conf_pb2.RateLimitUnit.Name(policy.unit)
    except ValueError:
        unit = str(policy.unit)
    return ParsedLimit(
        node=None,
        path="",
        unit=unit,
        requests_per_unit=policy.requests_per_unit,
        unlimited=policy.unlimited,
        name=policy.name,
        replaces=[r.name for r in policy.replaces],
        algorithm=_algorithm(policy.algorithm),
        burst=policy.burst if policy.HasField("burst") else None,
        unit_multiplier=policy.unit_multiplier or None,
        in_list=in_list,
    )


def _algorithm(number: int) -> str:
    """The YAML spelling of a RateLimitAlgorithm ("" for the default, fixed_window)."""
    if not number:
        return ""
    try:
        return str(rls_conf_pb2.RateLimitAlgorithm.Name(number)).lower()
    except ValueError:
        return str(number)


# -- reconnect backoff -------------------------------------------------------------------------


@dataclass
class Backoff:
    """``initial * 2**n`` capped at ``maximum``; with jitter, scaled by a random factor in
    ``[1 - random_factor, 1 + random_factor]`` (still capped). ``reset`` after a healthy stream."""

    initial: float
    maximum: float
    random_factor: float
    jitter: bool
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.initial * 2.0 ** min(self.attempt, _MAX_DOUBLINGS), self.maximum)
        self.attempt += 1
        if self.jitter and self.random_factor > 0:
            delay *= 1.0 + self.random_factor * (2.0 * self.rand() - 1.0)
        return max(0.0, min(delay, self.maximum))

    def reset(self) -> None:
        self.attempt = 0


# -- the client ----------------------------------------------------------------------------------


class _StreamBroken(Exception):
    """The ADS stream ended or failed; reconnect after a backoff."""


class XdsConfigClient:
    """A ``ConfigSource``: subscribes to rate-limit configs over ADS and reports each accepted
    one (or the error of a rejected one) to the sink given to ``start``.

    ``start(sink)`` launches the stream in a task and, with ``wait_first``, returns once the
    first config is accepted; ``wait_first_config()`` waits for it; ``close()`` stops everything.
    ``sleep`` and ``rand`` drive the reconnect backoff (tests replace them).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        wait_first: bool = False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.settings = settings
        self.wait_first = wait_first
        self._sink: ConfigSink | None = None
        self.sleep = sleep
        self.max_message_bytes = max_message_bytes
        self.backoff = Backoff(
            settings.xds.backoff_initial_interval,
            settings.xds.backoff_max_interval,
            settings.xds.backoff_random_factor,
            settings.xds.backoff_jitter,
            rand,
        )
        self.config: RateLimitConfig | None = None  # the last accepted config
        self.version = ""  # its version_info
        self.nonce = ""  # the nonce of the response that brought it
        self._node = _node(settings)
        # gRPC metadata keys are lower case; values of "-bin" keys travel as bytes.
        self._metadata = tuple(
            (key.lower(), value.encode() if key.lower().endswith("-bin") else value)
            for key, value in settings.xds.client_additional_headers.items()
        )
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, sink: ConfigSink) -> None:
        """Check the TLS files, then run the subscription in the background (and, with
        ``wait_first``, wait for the first accepted config; requests meanwhile get "no
        configuration loaded" only when FORCE_START_WITHOUT_INITIAL_CONFIG chose not to wait)."""
        self._sink = sink
        self._credentials()  # a missing or unreadable file stops startup, naming the variable
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="xds-config-client")
        if self.wait_first:
            log.warning(
                "waiting for the first rate limit configuration from %s",
                self.settings.xds.server_url,
            )
            await self.wait_first_config()

    async def wait_first_config(self) -> RateLimitConfig:
        """The first accepted config (bound the wait with ``asyncio.timeout``); raises
        ConfigError if the client is closed before one arrives."""
        await self._loaded.wait()
        if self.config is None:
            raise ConfigError("xDS client closed before any configuration was loaded")
        return self.config

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._loaded.set()  # release anyone still waiting for a first config

    # -- the stream ----------------------------------------------------------------------------

    async def _run(self) -> None:
        url = self.settings.xds.server_url
        while True:
            try:
                await self._stream(url)
                reason = "the server ended the stream"
            except _StreamBroken as exc:
                reason = str(exc)
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except (OSError, SettingsError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not end config updates for good
                log.exception("unexpected error in the xDS client")
                reason = repr(exc)
            delay = self.backoff.next()
            log.warning(
                "xDS stream to '%s' failed (%s); reconnecting in %.1fs", url, reason, delay
            )
            await self.sleep(delay)

    async def _stream(self, url: str) -> None:
        log.info("Connecting to xDS management server '%s'", url)
        async with self._channel(url) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(metadata=self._metadata)
            # Resume from the last accepted version: the server may skip an unchanged state.
            await self._send(call, self._request(self.version))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                self.backoff.reset()  # the connection works: the next failure starts afresh
                reply = await self._apply(response)
                if reply is not None:
                    await self._send(call, reply)

    @staticmethod
    async def _send(call: Any, request: Any) -> None:
        try:
            await call.write(request)
        except asyncio.InvalidStateError:  # the RPC finished under us; read() says how
            raise _StreamBroken("the stream closed while sending") from None

    async def _apply(self, response: Any) -> Any:
        """Load one response; return the ACK or NACK to send (None: not ours, ignored). A big
        one is built in a child process (config/load_process.py), as a file is: building it here
        would hold the event loop that serves requests (docs/reliability.md)."""
        if response.type_url != TYPE_URL:
            log.warning("ignoring an xDS response of unrequested type '%s'", response.type_url)
            return None
        merge, fixed_only = self.settings.merge_domain_config, fixed_windows_only(self.settings)
        pickled: bytes | None = None
        try:
            if sum(len(resource.value) for resource in response.resources) < OFFLOOP_BYTES:
                config = load_resources(
                    response.resources, merge_domains=merge, fixed_windows_only=fixed_only
                )
            else:
                loaded = await build_in_child(
                    load_resources,
                    list(response.resources),
                    merge_domains=merge,
                    fixed_windows_only=fixed_only,
                )
                assert loaded is not None  # load_resources always returns a config
                config, pickled = loaded.config, loaded.pickled
        except ConfigError as exc:
            if self._sink is not None:
                self._sink.failed(exc)
            return self._request(
                self.version,
                nonce=response.nonce,
                error=status_pb2.Status(code=_INVALID_ARGUMENT, message=str(exc)),
            )
        self.config, self.version, self.nonce = config, response.version_info, response.nonce
        if self._sink is not None:
            self._sink.loaded(config, f" (xDS version '{self.version}')", pickled=pickled)
        self._loaded.set()
        return self._request(self.version, nonce=response.nonce)

    def _request(self, version: str, *, nonce: str = "", error: Any = None) -> Any:
        return discovery_pb2.DiscoveryRequest(
            version_info=version,
            node=self._node,
            type_url=TYPE_URL,  # no resource_names: a wildcard subscription
            response_nonce=nonce,
            error_detail=error,
        )

    # -- the channel ---------------------------------------------------------------------------

    def _channel(self, url: str) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        credentials = self._credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(url, options=options)
        san = self.settings.xds.server_tls_san
        if san:
            options.append(("grpc.ssl_target_name_override", san))
        return grpc.aio.secure_channel(url, credentials, options=options)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, read afresh for every connection so rotated files are picked up."""
        s = self.settings
        if not s.xds.server_use_tls:
            return None
        files = {
            "CONFIG_GRPC_XDS_SERVER_TLS_CACERT": s.xds.server_tls_cacert,
            "CONFIG_GRPC_XDS_CLIENT_TLS_CERT": s.xds.client_tls_cert,
            "CONFIG_GRPC_XDS_CLIENT_TLS_KEY": s.xds.client_tls_key,
        }
        if bool(files["CONFIG_GRPC_XDS_CLIENT_TLS_CERT"]) != bool(
            files["CONFIG_GRPC_XDS_CLIENT_TLS_KEY"]
        ):
            raise SettingsError(
                "CONFIG_GRPC_XDS_CLIENT_TLS_CERT and CONFIG_GRPC_XDS_CLIENT_TLS_KEY must be set "
                "together (client certificate for mTLS to the xDS server)"
            )
        data = _read_files(files)
        # No CA: the system's roots, as the reference.
        return grpc.ssl_channel_credentials(
            root_certificates=data["CONFIG_GRPC_XDS_SERVER_TLS_CACERT"],
            private_key=data["CONFIG_GRPC_XDS_CLIENT_TLS_KEY"],
            certificate_chain=data["CONFIG_GRPC_XDS_CLIENT_TLS_CERT"],
        )


def _read_files(paths: Mapping[str, str]) -> dict[str, bytes | None]:
    data: dict[str, bytes | None] = {}
    for variable, path in paths.items():
        try:
            data[variable] = Path(path).read_bytes() if path else None
        except OSError as exc:
            raise SettingsError(f"{variable}: cannot read {path!r}: {exc.strerror}") from None
    return data


def _node(settings: Settings) -> Any:
    metadata = Struct()
    metadata.update(dict(settings.xds.node_metadata))
    return base_pb2.Node(
        id=settings.xds.node_id,
        metadata=metadata,
        user_agent_name="ratelimit-svc",
        user_agent_version=__version__,
    )
