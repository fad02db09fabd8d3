"""The console's one HTML page (``console.html``, package data) and the headers it is served with.

The page has no external assets (it must work in an air-gapped cluster): its style and script are
inline. The Content-Security-Policy allows exactly that script (by its hash), fetches to this
listener only, no frames and no form posts elsewhere, so even a value that slipped past the page's
text-only rendering could not run or load anything (docs/console.md).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Page:
    html: str
    headers: dict[str, str]


@cache
def console_page() -> Page:
    html = resources.files(__package__).joinpath("console.html").read_text(encoding="utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _SCRIPT.findall(html)
    )
    policy = (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return Page(html, {**SECURITY_HEADERS, "Content-Security-Policy": policy})
