"""Comparing one request's answers and the Redis keyspaces of the two services.

Answers are compared as protobuf JSON (gRPC responses converted the way ``/json`` writes them).
When they differ, the documented differences of docs/compatibility.md are tried one at a time:
each is a rewrite, named by its allow-list ID, that turns the two answers into the same form
where, and only where, that difference explains them. A difference no allowed rewrite removes is
unexplained. ``load_allow_list`` reads the IDs from the page's table, so an ID the page does not
list cannot excuse anything.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelimit_svc.config.rules import RateLimitConfig, Unit
from ratelimit_svc.limiter.matching import Match, Override, match

COMPATIBILITY_PAGE = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"
_ROW = re.compile(r"^\|\s*`([a-z0-9-]+)`\s*\|\s*(deliberate|reference-version)\s*\|")


def load_allow_list(page: Path = COMPATIBILITY_PAGE) -> dict[str, str]:
    """ID -> kind for every row of the page's allow-list table."""
    rows = {}
    for line in page.read_text(encoding="utf-8").splitlines():
        found = _ROW.match(line)
        if found:
            rows[found[1]] = found[2]
    return rows


@dataclass(frozen=True)
class Outcome:
    """An answer (protobuf JSON and the HTTP status for ``/json``) or an error."""

    kind: str  # "answer" | "error"
    body: Any = None
    detail: str = ""


@dataclass
class Context:
    """What the rewrites may consult: the profile's settings, the request, our rule tree."""

    settings: dict[str, str]
    request: dict[str, Any]
    config: RateLimitConfig | None


Rewrite = Callable[[Context, Outcome, Outcome], tuple[Outcome, Outcome] | None]


def _flag(context: Context, name: str) -> bool:
    return context.settings.get(name, "false") == "true"


def _matches(context: Context) -> list[Match | None]:
    """Our rule per descriptor, replaced rules dropped (as the limiter does)."""
    config, request = context.config, context.request
    domain = request.get("domain", "")
    if config is None or domain not in config.domains:
        return [None] * len(request.get("descriptors", []))
    found: list[Match | None] = []
    for descriptor in request["descriptors"]:
        entries = [(e.get("key", ""), e.get("value", "")) for e in descriptor.get("entries", [])]
        limit = descriptor.get("limit")
        override = None
        if limit is not None:
            unit = limit.get("unit", 0)
            unit = Unit[unit] if isinstance(unit, str) else Unit(unit)
            override = Override(int(limit.get("requestsPerUnit", 0)), unit)
        found.append(match(config, domain, entries, override))
    names = {n for m in found if m is not None for n in m.rule.replaces}
    return [
        None if m is not None and m.rule.name in names and not m.rule.unlimited else m
        for m in found
    ]


def error_status_codes(context: Context, ref: Outcome, ours: Outcome) -> tuple[Outcome, Outcome] | None:
    """Both refused the request: the reference says UNKNOWN (HTTP 400/500), we say
    INVALID_ARGUMENT or UNAVAILABLE (HTTP 400/503)."""
    if ref.kind == "error" and ours.kind == "error":
        return Outcome("error"), Outcome("error")
    return None


def quota_mode_upstream(context: Context, ref: Outcome, ours: Outcome) -> tuple[Outcome, Outcome] | None:
    """The pinned reference predates upstream's quota-mode rework: an over-limit quota rule is
    reported as an OK status (no reset) and never makes the overall code OVER_LIMIT. Rewrite our
    answer to that form."""
    if ours.kind != "answer" or ref.kind != "answer":
        return None
    global_quota = _flag(context, "QUOTA_MODE")
    matches = _matches(context)
    body = copy.deepcopy(ours.body)
    response = body["response"]
    statuses = response.get("statuses", [])
    changed = False
    over = False
    for index, status in enumerate(statuses):
        found = matches[index] if index < len(matches) else None
        unlimited = found is not None and found.rule.unlimited
        is_quota = not unlimited and (global_quota or (found is not None and found.rule.quota_mode))
        if status.get("code") == "OVER_LIMIT":
            if is_quota:
                status.pop("durationUntilReset", None)
                status["code"] = "OK"
                changed = True
            else:
                over = True
    overall = "OVER_LIMIT" if over and not _flag(context, "SHADOW_MODE") else "OK"
    if response.get("overallCode") != overall:
        response["overallCode"] = overall
        changed = True
    if "http" in body:
        body["http"] = 429 if overall == "OVER_LIMIT" else 200
    return (ref, Outcome("answer", body)) if changed else None


_LIMIT_TEXT = re.compile(r"requests_per_unit:\s*(\d+)|unit:\s*([A-Z]+|\d+)")


def dynamic_metadata_shape(context: Context, ref: Outcome, ours: Outcome) -> tuple[Outcome, Outcome] | None:
    """Dynamic metadata: the reference writes an override's limit as Go's protobuf text and adds
    its quota fields (quotaModeEnabled, quotaModeViolations); we write the limit as a struct and
    return the merged rule ``metadata``. Bring both to one form."""
    if ours.kind != "answer" or ref.kind != "answer":
        return None
    ref_body, our_body = copy.deepcopy(ref.body), copy.deepcopy(ours.body)
    ref_meta = ref_body["response"].get("dynamicMetadata")
    our_meta = our_body["response"].get("dynamicMetadata")
    if ref_meta is None or our_meta is None:
        return None
    for descriptor in ref_meta.get("descriptors", []):
        limit = descriptor.get("limit")
        if isinstance(limit, str):
            number = unit = None
            for found in _LIMIT_TEXT.finditer(limit):
                number = int(found[1]) if found[1] else number
                unit = found[2] or unit
            if unit is not None and unit.isdigit():
                unit = Unit(int(unit)).name
            descriptor["limit"] = {"requestsPerUnit": number or 0, "unit": unit or "UNKNOWN"}
    for descriptor in our_meta.get("descriptors", []):
        limit = descriptor.get("limit")
        if isinstance(limit, dict):
            descriptor["limit"] = {
                "requestsPerUnit": int(limit.get("requestsPerUnit", 0)),
                "unit": limit.get("unit", "UNKNOWN"),
            }
    ref_meta.pop("quotaModeEnabled", None)
    ref_meta.pop("quotaModeViolations", None)
    our_meta.pop("metadata", None)
    return Outcome("answer", ref_body), Outcome("answer", our_body)


REWRITES: dict[str, Rewrite] = {
    "error-status-codes": error_status_codes,
    "quota-mode-upstream": quota_mode_upstream,
    "dynamic-metadata-shape": dynamic_metadata_shape,
}


@dataclass
class Verdict:
    equal: bool
    explained_by: list[str] = field(default_factory=list)


def compare_answers(
    context: Context, ref: Outcome, ours: Outcome, allowed: Sequence[str]
) -> Verdict:
    """Equal, equal once allowed rewrites are applied (which ones), or unexplained."""
    if ref == ours:
        return Verdict(True)
    used: list[str] = []
    for name, rewrite in REWRITES.items():
        if name not in allowed:
            continue
        rewritten = rewrite(context, ref, ours)
        if rewritten is None:
            continue
        ref, ours = rewritten
        used.append(name)
        if ref == ours:
            return Verdict(True, used)
    return Verdict(False, used)


Snapshot = dict[str, tuple[bytes | None, int]]  # key -> (value, PTTL in ms; -1: no expiry)

TTL_TOLERANCE_MS = 2000
EXPIRING_MS = 300  # a key this close to expiry may be gone on one side only: not compared


def snapshot(client: Any, pattern: str = "*") -> Snapshot:
    keys = sorted(client.keys(pattern))
    if not keys:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        results = pipe.execute()
    return {
        key.decode(): (results[2 * i], int(results[2 * i + 1]))
        for i, key in enumerate(keys)
        if int(results[2 * i + 1]) != -2
    }


def compare_keyspaces(ref: Snapshot, ours: Snapshot) -> list[str]:
    """Every key, value and TTL (within TTL_TOLERANCE_MS) that differs."""
    problems = []
    for key in sorted(set(ref) | set(ours)):
        left, right = ref.get(key), ours.get(key)
        if left is None or right is None:
            present = left or right
            assert present is not None
            if 0 <= present[1] < EXPIRING_MS:
                continue
            side = "reference" if left is not None else "ratelimit-svc"
            problems.append(f"key {key!r} only in {side}'s Redis ({present[0]!r}, ttl {present[1]} ms)")
            continue
        if (0 <= left[1] < EXPIRING_MS) or (0 <= right[1] < EXPIRING_MS):
            continue
        if left[0] != right[0]:
            problems.append(f"key {key!r}: reference {left[0]!r}, ratelimit-svc {right[0]!r}")
        elif (left[1] == -1) != (right[1] == -1) or abs(left[1] - right[1]) > TTL_TOLERANCE_MS:
            problems.append(f"key {key!r}: ttl reference {left[1]} ms, ratelimit-svc {right[1]} ms")
    return problems
