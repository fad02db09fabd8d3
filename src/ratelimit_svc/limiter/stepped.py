"""The limiter's side of docs/algorithms.md: turning matched rules that go beyond the reference
(sliding windows, token buckets, any window length, several limits, charge only when admitted)
into store steps with their documented keys, and store results back into statuses and stats.

Rules that leave every new field at its default never come here: the limiter counts them as the
reference does, with the reference's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratelimit_svc.config.rules import Algorithm, Rule
from ratelimit_svc.limiter.algorithms import (
    US,
    Step,
    StepResult,
    Verdict,
    gcra_interval,
    verdict,
)


@dataclass(slots=True)
class Stepped:
    """One limit of one descriptor, counted through a store step."""

    index: int  # the descriptor's position in the request
    rule: Rule  # the limit (a rule's first limit is the rule itself)
    stats_key: str
    quota: bool
    step: Step
    result: StepResult | None = None


def limit_key(prefix: str, key_body: str, limit: Rule, now: int) -> str:
    """The counter key of a limit (docs/algorithms.md, "Keys"). A rule's limits share the hash
    tag ``{<key_body>}`` so that one cluster slot holds all of them."""
    window = limit.window_seconds
    if limit.algorithm is Algorithm.FIXED_WINDOW:
        if limit.unit_multiplier == 1 and not limit.stats_suffix:
            # One plain fixed window (with charge_only_when_admitted): the reference's key.
            return f"{prefix}{key_body}{now - now % window}"
        return f"{prefix}fw:{{{key_body}}}{window}:{now - now % window}"
    return f"{prefix}{limit.algorithm.key_tag}:{{{key_body}}}{window}"


def make_step(
    limit: Rule,
    key: str,
    hits: int,
    now_us: int,
    ttl: int,
    *,
    conditional: bool,
    binding: bool,
) -> Step:
    """The store step for one limit at ``now_us``; ``ttl`` (seconds, fixed windows only) is the
    window plus jitter, as for the reference's counters."""
    window = limit.window_seconds
    length = window * US
    algorithm = limit.algorithm
    if algorithm is Algorithm.TOKEN_BUCKET:
        interval = gcra_interval(limit.requests_per_unit, length)
        burst = limit.burst or limit.requests_per_unit
        p1, p2 = interval, burst * interval
    else:
        p1, p2 = now_us - now_us % length, length
    return Step(
        algorithm, key, hits, limit.requests_per_unit, p1, p2, ttl, conditional, binding, window
    )


def judge(item: Stepped, now_us: int) -> Verdict:
    assert item.result is not None
    return verdict(item.step, item.result, now_us)
