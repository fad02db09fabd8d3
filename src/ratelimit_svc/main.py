"""The console scripts: ``ratelimit`` (the service), ``ratelimit-config-check`` and
``ratelimit-client`` (docs/operations.md). The two tools accept the reference's flag names in
single- and double-dash form (``-config_dir`` and ``--config_dir``), print the reference's lines,
and exit 1 on error."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ratelimit_svc import __version__
from ratelimit_svc.errors import ConfigError, RateLimitSvcError, SettingsError
from ratelimit_svc.logsetup import configure_logging
from ratelimit_svc.settings.model import Settings
from ratelimit_svc.workers.launch import run

log = logging.getLogger(__name__)


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    """``--name`` and Go's ``-name``; with hyphens too (the reference client spells its TLS
    flags ``-grpc-use-tls``, docs/operations.md (Command-line tools) ``--grpc_use_tls``)."""
    spellings = [f"--{name}", f"-{name}"]
    if "_" in name:
        hyphens = name.replace("_", "-")
        spellings += [f"--{hyphens}", f"-{hyphens}"]
    parser.add_argument(*spellings, dest=name, **kwargs)  # type: ignore[arg-type]


def config_check_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ratelimit-config-check", description="Validate rate-limit config files."
    )
    _flag(parser, "config_dir", required=True, help="directory holding the YAML files")
    _flag(
        parser,
        "merge_domain_configs",
        action="store_true",
        help="merge files that declare the same domain (MERGE_DOMAIN_CONFIG)",
    )
    _flag(
        parser,
        "backend_type",
        default="",
        help="check the rules against this BACKEND_TYPE too (memcache counts fixed windows "
        "only: docs/algorithms.md)",
    )
    args = parser.parse_args(argv)
    # Imported here: the service's outer process does not load the YAML loader (docs/performance.md
    # (Memory)).
    from ratelimit_svc.config.loader import ConfigFile, load_config

    print("checking rate limit configs...")
    directory = Path(args.config_dir)
    print(f"loading config directory: {args.config_dir}")
    files = []
    try:
        paths = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        print(f"error opening directory {args.config_dir}: {exc.strerror}")  # the reference's
        sys.exit(1)
    for path in paths:
        print(f"opening config file: {path}")
        try:
            files.append(ConfigFile(str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error loading rate limit configs: {path}: error loading config file: {exc}")
            sys.exit(1)
    try:
        load_config(
            files,
            merge_domains=args.merge_domain_configs,
            fixed_windows_only="memcache" if args.backend_type == "memcache" else "",
        )
    except ConfigError as exc:
        print(f"error loading rate limit configs: {exc}")
        sys.exit(1)
    print("all rate limit configs ok")


def _count_arg(raw: str) -> int:
    """A number of hits: a whole number from 0 to 2^32-1 (argparse turns the error into a usage
    line)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0 to {2**32 - 1})")
    return value


def _seconds_arg(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{raw} must be a positive number of seconds")
    return value


def client_main(argv: Sequence[str] | None = None) -> None:
    # Imported here so that config-check does not pay for gRPC.
    import grpc
    from google.protobuf import text_format

    from ratelimit_svc.pb.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
    from ratelimit_svc.pb.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    parser = argparse.ArgumentParser(
        prog="ratelimit-client", description="Send one ShouldRateLimit request, print the answer."
    )
    _flag(parser, "dial_string", default="localhost:8081", help="host:port of the service")
    _flag(parser, "domain", default="", help="rate limit domain")
    _flag(
        parser,
        "descriptors",
        action="append",
        default=[],
        help="one descriptor as k=v,k2=v2 (repeat the flag for several)",
    )
    _flag(
        parser, "hits_addend", type=_count_arg, default=0,
        help="hits to add to every descriptor (0, the default, means 1)",
    )  # fmt: skip
    _flag(
        parser, "peek", action="store_true",
        help="look without counting: each descriptor is sent with hits_addend 0, so the answer "
        "shows the limit, what remains and the reset while nothing is added",
    )  # fmt: skip
    _flag(parser, "timeout", type=_seconds_arg, default=5.0, help="seconds to wait for the answer")
    _flag(parser, "grpc_use_tls", action="store_true", help="connect with TLS")
    _flag(parser, "grpc_server_ca_file", default="", help="CA that signed the server certificate")
    _flag(parser, "grpc_cert_file", default="", help="client certificate (mTLS)")
    _flag(parser, "grpc_key_file", default="", help="client key (mTLS)")
    _flag(parser, "grpc_tls_server_name", default="", help="override the TLS server name")
    args = parser.parse_args(argv)
    if args.peek and args.hits_addend:
        parser.error("--peek counts nothing: it cannot be combined with --hits_addend")

    request = rls_pb2.RateLimitRequest(domain=args.domain, hits_addend=args.hits_addend)
    for spec in args.descriptors:
        descriptor = ratelimit_pb2.RateLimitDescriptor()
        for pair in spec.split(","):
            key, sep, value = pair.partition("=")
            if not sep:
                parser.error(f"invalid descriptor entry {pair!r}: expected key=value")
            descriptor.entries.add(key=key, value=value)
        if args.peek:
            # The per-descriptor wrapper set to 0 means "add nothing" (the request-level 0
            # means 1): the service reads the counter and answers as for a check.
            descriptor.hits_addend.value = 0
        request.descriptors.append(descriptor)

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    if args.grpc_use_tls:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(args.grpc_server_ca_file),
                private_key=read(args.grpc_key_file),
                certificate_chain=read(args.grpc_cert_file),
            )
        except OSError as exc:
            print(f"error reading TLS files: {exc.filename}: {exc.strerror}")
            sys.exit(1)
        options = []
        if args.grpc_tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.grpc_tls_server_name))
        channel = grpc.secure_channel(args.dial_string, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.dial_string)
    print(f"domain: {args.domain}")
    print(f"descriptors: {args.descriptors}")
    with channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        try:
            response = stub.ShouldRateLimit(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"request error: {exc.code().name}: {exc.details()}")
            sys.exit(1)
    print("response: " + text_format.MessageToString(response, as_one_line=False))
    if args.peek:
        for spec, status in zip(args.descriptors, response.statuses, strict=False):
            limit = status.current_limit
            if not limit.requests_per_unit:
                print(f"peek {spec}: no limit applies")
                continue
            used = limit.requests_per_unit - status.limit_remaining
            unit = rls_pb2.RateLimitResponse.RateLimit.Unit.Name(limit.unit).lower()
            print(
                f"peek {spec}: {used}/{limit.requests_per_unit} per {unit} used"
                f"{' (at or over the limit)' if status.limit_remaining == 0 else ''}, "
                f"{status.limit_remaining} remaining, resets in "
                f"{status.duration_until_reset.seconds}s"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``ratelimit`` takes no arguments but ``--help`` and ``--version``: it is configured by
    environment variables, as the reference."""
    parser = argparse.ArgumentParser(
        prog="ratelimit",
        description=(
            "Envoy's global rate-limit service (envoyproxy/ratelimit compatible). Configured "
            "only by environment variables: BACKEND_TYPE (redis, memcache, memory), REDIS_URL, "
            "RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY (the rules), PORT, "
            "GRPC_PORT, DEBUG_PORT, LOG_LEVEL and more."
        ),
        epilog="Every setting: README.md (Configuration); deployment: docs/deployment.md.",
    )
    parser.add_argument("--version", action="version", version=f"ratelimit-svc {__version__}")
    return parser.parse_args(argv)


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go programs do at startup: every connection
    is a file descriptor, and the common soft limit of 1024 is a few busy clients away."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling then
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return
        log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d", soft, target)
    else:
        log.info("open-file limit (RLIMIT_NOFILE): %d", soft)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``ratelimit``: configured only by environment variables."""
    parse_args(argv)
    # Until the event loop handles them (app.serve), and for good in the processes it never runs
    # in (the fork server, config loads): a stray SIGHUP/SIGUSR1/SIGUSR2 must not kill them.
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        sys.exit(1)
    configure_logging(settings)
    raise_open_file_limit()
    try:
        run(settings, os.environ)  # WORKERS processes (one: just serve(settings))
    except RateLimitSvcError as exc:
        log.error("%s", exc)
        sys.exit(1)
