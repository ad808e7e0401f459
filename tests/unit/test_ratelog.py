"""RateLimitedLog: a few lines per kind and interval, then one count of the rest."""

from __future__ import annotations

import logging

import pytest

from memplug.daemon.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_key_gets_its_burst_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), interval=10, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        logged = [limited.warning(("shed", 65534), "shed uid=%d", 65534) for _ in range(1000)]
        assert limited.warning(("shed", 1000), "shed uid=%d", 1000), "another key has its own"
        clock.now += 10
        assert limited.warning(("shed", 65534), "shed uid=%d", 65534)
    assert logged.count(True) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:4] == ["shed uid=65534"] * 3 + ["shed uid=1000"]
    assert messages[4] == "shed uid=65534 (997 more like this held back in the previous 10 s)"
    assert len(messages) == 5


def test_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("test.ratelog.quiet"), burst=1)
    with caplog.at_level(logging.WARNING, logger="test.ratelog.quiet"):
        assert not limited.debug("idle", "closing an idle connection")
        assert limited.warning("idle", "a warning still gets through")
    assert [r.getMessage() for r in caplog.records] == ["a warning still gets through"]
