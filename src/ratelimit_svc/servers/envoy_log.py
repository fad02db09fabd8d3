"""Envoy's own log on the pyvoy transport (docs/transports.md): Envoy writes its records to a pipe
in a fixed, one-line format and the process that started it logs each one again through Python's
logging, as ``envoy.<component>``. So they take LOG_FORMAT and the credential redaction like every
other line, and count as a library's: WARNING and above only, unless LOG_LEVEL=TRACE, which also
runs Envoy at debug (docs/observability.md (Logging)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from ratelimit_svc.settings.model import Settings

FLUSH_MILLISECONDS = 100  # Envoy buffers its log file: lines reach us within this
RELAY_DRAIN_SECONDS = 1.0  # after Envoy exited, for its last lines to be read
_FORMAT = "%l %n %v"  # level, component, message (newlines escaped: --log-format-escaped)
_LINE_LIMIT = 1 << 20
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def log_record(line: str) -> None:
    """Log one line of Envoy's as the record it is."""
    level, _, rest = line.rstrip("\n").partition(" ")
    component, _, message = rest.partition(" ")
    logging.getLogger(f"envoy.{component or 'envoy'}").log(
        _LEVELS.get(level, logging.WARNING), "%s", message
    )


class EnvoyLog:
    """The pipe one Envoy logs into, and the task that reads it until Envoy has exited."""

    def __init__(self, settings: Settings) -> None:
        # Envoy's warnings are about its own defaults (no connection limit configured, SIGTERM
        # caught) and would come at every start and stop: only errors, unless tracing.
        self.level = "debug" if settings.log_level == "TRACE" else "error"
        self._read, self.write_fd = os.pipe()
        self._relay: asyncio.Task[None] | None = None
        self._muted = False

    def argv(self) -> list[str]:
        """Envoy's options: its log to our pipe (``write_fd``, passed to it), one line a record."""
        return [
            "--log-level", self.level,
            "--log-path", f"/proc/self/fd/{self.write_fd}",
            "--log-format", _FORMAT,
            "--log-format-escaped",
            "--file-flush-interval-msec", str(FLUSH_MILLISECONDS),
        ]  # fmt: skip

    def start(self) -> None:
        """Envoy has started (it holds the write end now): read what it logs."""
        os.close(self.write_fd)
        self._relay = asyncio.get_running_loop().create_task(self._forward(), name="envoy-log")

    async def _forward(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._read, "rb", 0)
        )
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line beyond the limit is dropped, not the rest
                    continue
                if not line:
                    return
                if not self._muted:
                    log_record(line.decode(errors="replace"))
        finally:
            transport.close()

    def mute(self) -> None:
        """Read but do not log what Envoy says from now on (it would repeat what was logged)."""
        self._muted = True

    def discard(self) -> None:
        """Envoy did not start: the pipe is closed unread."""
        os.close(self.write_fd)
        os.close(self._read)

    async def closed(self) -> None:
        """Envoy has exited: its last lines, read within a bound."""
        if self._relay is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELAY_DRAIN_SECONDS):
                await asyncio.shield(self._relay)
        self._relay.cancel()
