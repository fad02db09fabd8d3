"""Where the loaded configuration came from and how its loads went (the console's rules panel).

Whoever swaps configs in (the file reloader or the xDS client) tells one ``ConfigStatus`` of each
load: the time of the last success and, for xDS, the version and nonce it acknowledged; the last
error with the file and line the message names. Only the latest of each is kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# ConfigError texts start with the config name and point at "(line N" (docs/configuration.md).
_LINE = re.compile(r"\(line (\d+)")


@dataclass(frozen=True, slots=True)
class LoadError:
    message: str
    at: float
    file: str
    line: int | None


def load_error(message: str, at: float) -> LoadError:
    """``message`` with the file (its ``name:`` prefix) and the line it names, if any."""
    file = message.split(": ", 1)[0] if ": " in message else ""
    found = _LINE.search(message)
    return LoadError(message, at, file, int(found.group(1)) if found else None)


@dataclass
class ConfigStatus:
    """The last successful load and the last failed one; ``source`` is ``file`` or ``xds``."""

    source: str = "file"
    clock: Callable[[], float] = field(default=time.time, repr=False)
    loaded_at: float | None = None
    loads: int = 0
    failures: int = 0
    last_error: LoadError | None = None
    xds_version: str = ""
    xds_nonce: str = ""

    def loaded(self, *, version: str = "", nonce: str = "") -> None:
        self.loaded_at = self.clock()
        self.loads += 1
        self.xds_version, self.xds_nonce = version, nonce

    def failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = load_error(message, self.clock())
