"""Logging, configured once at startup: LOG_LEVEL with the reference's level names, LOG_FORMAT
text or the reference's JSON keys, and a filter that redacts credentials from every record
(docs/observability.md (Logging)).

LOG_LEVEL=TRACE also shows the libraries' own debug records; below it they are kept to WARNING and
above (``LibraryFilter``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TextIO

from ratelimit_svc.settings.model import Settings
from ratelimit_svc.settings.parse import REDACTED

LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
    "PANIC": logging.CRITICAL,
}
_LOGRUS_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
_HANDLER_NAME = "ratelimit_svc"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# scheme://user:password@host -> scheme://user:<redacted>@host (and //password@host alike)
_URL_USERINFO = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^\s/@:]*:)?)[^\s/@]+@")
_PAIR = re.compile(
    r"(?P<head>\b(?:[A-Z_]*AUTH|password|passwd|pwd|secret|token)\b[\"']?\s*[=:]\s*[\"']?)"
    r"[^\s\"',;&)}\]]+",
    re.IGNORECASE,
)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The credential values in ``settings``, and their password halves (``user:password``)."""
    found: set[str] = set()
    for redis in (settings.redis, settings.redis_persecond_settings):
        for value in (redis.auth, redis.sentinel_auth):
            if value:
                found.add(value)
                if ":" in value:
                    found.add(value.partition(":")[2])
    found.update(v for v in settings.xds.client_additional_headers.values() if v)
    return tuple(s for s in found if s)


class RedactFilter(logging.Filter):
    """Masks credentials in a record's message and exception text (the record is changed)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so "user:pw" is masked whole before "pw" alone.
        self.secrets = tuple(sorted(set(secrets), key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = _URL_USERINFO.sub(rf"\g<head>{REDACTED}@", text)
        return _PAIR.sub(rf"\g<head>{REDACTED}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, keyed like the reference's logrus JSON formatter."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds")
        entry: dict[str, object] = {
            "@timestamp": stamp.replace("+00:00", "Z"),
            "@message": record.getMessage(),
            "level": _LOGRUS_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class LibraryFilter(logging.Filter):
    """Lets a library's record (asyncio, aiohttp, grpc, watchdog...) through at WARNING and above
    only: LOG_LEVEL=DEBUG is about this service, and the libraries' debug output (every watched
    file event, every connection) would drown it. LOG_LEVEL=TRACE shows theirs too."""

    def __init__(self, own_prefix: str = "ratelimit_svc", library_level: int = logging.WARNING):
        super().__init__()
        self.own_prefix = own_prefix
        self.library_level = library_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.library_level:
            return True
        name = record.name
        return name == self.own_prefix or name.startswith(self.own_prefix + ".")


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) at LOG_LEVEL in LOG_FORMAT, redacted;
    libraries' records below WARNING only with LOG_LEVEL=TRACE (``LibraryFilter``)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    if settings.log_level != "TRACE":
        handler.addFilter(LibraryFilter())
    handler.addFilter(RedactFilter(secrets_of(settings)))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # configured again (tests): replace, never stack
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[settings.log_level])
    return handler
