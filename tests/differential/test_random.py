"""The seeded random differential run (docs/compatibility.md, "The differential test").

DIFF_SEED, DIFF_CONFIGS and DIFF_REQUESTS (requests per config) size it; the defaults are the
short run of ``make test``; ``make differential`` runs a long one. Configs are grouped into
profiles of DIFF_CONFIGS_PER_PROFILE, each with its own random settings and a fresh pair of
services. Every difference must be one the compatibility page's allow-list names.
"""

from __future__ import annotations

import os
from pathlib import Path

from support.redis_fixtures import RedisServer

from .generator import Generator
from .harness import Report, describe, run_profile


def test_random_configs_and_requests_answer_alike(
    reference_binary: str,
    redises: tuple[RedisServer, RedisServer],
    allowed: dict[str, str],
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("DIFF_SEED", "20260122"))
    configs = int(os.environ.get("DIFF_CONFIGS", "6"))
    requests = int(os.environ.get("DIFF_REQUESTS", "40"))
    per_profile = int(os.environ.get("DIFF_CONFIGS_PER_PROFILE", "3"))
    generator = Generator(seed)
    total = Report()
    failures = []
    for number, first in enumerate(range(0, configs, per_profile)):
        profile = generator.profile(f"p{number}", min(per_profile, configs - first), first)
        report = run_profile(
            reference_binary, redises, profile, generator, requests, tmp_path / profile.name,
            list(allowed),
        )  # fmt: skip
        total.add(report)
        if report.unexplained:
            failures.append(describe(profile) + "\n" + "\n".join(report.unexplained))
    print(f"\ndifferential run, seed {seed}: {total.summary()}")
    assert not failures, f"seed {seed}: {total.summary()}\n\n" + "\n\n".join(failures)
    assert total.requests > total.skipped, total.summary()  # something was compared
