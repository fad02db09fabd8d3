"""The fake clock: the only thing the tests fake."""

from __future__ import annotations

import pytest


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, now: float = 1700000005.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
