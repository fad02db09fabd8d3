"""The fixed-window decision for one counted rule: ``decide`` turns the limit, the hits and the
counter after them into the code, the remaining allowance and the stat deltas, as the reference
counts them (docs/configuration.md (How a request is answered)).
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass


class Code(enum.IntEnum):
    """Values are RateLimitResponse.Code's numbers."""

    UNKNOWN = 0
    OK = 1
    OVER_LIMIT = 2


@dataclass(slots=True)
class RuleCounts:
    """Per-rule stat deltas of one decision (names as the reference's stats)."""

    total_hits: int = 0
    over_limit: int = 0
    near_limit: int = 0
    within_limit: int = 0
    shadow_mode: int = 0
    over_limit_with_local_cache: int = 0


def near_threshold(limit: int, ratio: float) -> int:
    """floor(float32(limit) * float32(ratio)), as the reference computes it."""
    f32 = _float32(_float32(float(limit)) * _float32(ratio))
    return math.floor(f32)


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def decide(
    limit: int, hits: int, after: int, near: int, *, shadow: bool, cached: bool = False
) -> tuple[Code, int, RuleCounts]:
    """The pure fixed-window decision for one counted rule: (code, remaining, stat deltas).

    ``after`` is the counter after adding ``hits`` (ignored when ``cached``: the local cache
    already knows the key is over its limit).
    """
    counts = RuleCounts(total_hits=hits)
    before = after - hits
    if cached:
        code, remaining = Code.OVER_LIMIT, 0
        counts.over_limit = hits
        counts.over_limit_with_local_cache = hits
    elif after > limit:
        code, remaining = Code.OVER_LIMIT, 0
        counts.over_limit = hits if before >= limit else after - limit
        if before < limit:
            counts.near_limit = limit - max(near, before)
    else:
        code, remaining = Code.OK, limit - after
        counts.within_limit = hits
        if after > near:
            counts.near_limit = hits if before >= near else after - near
    if shadow and code is Code.OVER_LIMIT:
        code = Code.OK
        counts.shadow_mode = hits if cached or before >= limit else after - limit
    return code, remaining, counts
