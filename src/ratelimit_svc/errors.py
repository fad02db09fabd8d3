"""The service's small error hierarchy.

Every failure the service reports is one of these. Messages name the input and where it came from,
so an operator can fix the problem from the log line alone. They become gRPC statuses in exactly one
place (``service``).
"""

from __future__ import annotations

from collections.abc import Sequence


class RateLimitSvcError(Exception):
    """Base class of every error raised on purpose by ratelimit-svc."""


class SettingsError(RateLimitSvcError):
    """An environment variable holds a value that cannot be used; startup stops."""


class ConfigError(RateLimitSvcError):
    """A rate-limit configuration file (or xDS resource) is invalid; the old config stays."""


class BackendError(RateLimitSvcError):
    """The counter backend failed or timed out (answered as gRPC UNAVAILABLE)."""


class CounterError(RateLimitSvcError):
    """The backend refused one counter: its key holds something that cannot be counted (another
    type, a non-integer, a value at the overflow limit). The backend itself is fine, so this is
    no backend failure (no circuit breaker, no health change); only requests that use that
    counter fail, answered as gRPC FAILED_PRECONDITION (docs/backends.md, Error classes)."""


class RequestError(RateLimitSvcError):
    """The request itself is invalid (answered as gRPC INVALID_ARGUMENT)."""


class NoConfigError(RateLimitSvcError):
    """No rate-limit configuration was ever loaded (answered as gRPC UNAVAILABLE)."""

    def __init__(self) -> None:
        super().__init__("no rate limit configuration loaded")


def raise_unless_any_answered(outcomes: Sequence[object]) -> None:
    """For a ping sent to several servers: fine when any answered; else the first failure, as a
    BackendError (a store with several servers is up while one of them is)."""
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if len(errors) < len(outcomes):
        return
    if not errors:
        raise BackendError("no server to ask")
    error = errors[0]
    raise error if isinstance(error, BackendError) else BackendError(str(error))
