"""The reliability report's verdict on the daemon's usage over a load: flat or grew."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.reliability_figures import flatness, suite_rows, usage_summary


def series(values: Sequence[float], step: float = 5.0) -> list[list[float]]:
    return [[i * step, v] for i, v in enumerate(values)]


def test_a_steady_series_with_noise_is_flat() -> None:
    # 600 s, a sample every 5 s: RSS wobbling by 1 % around 50 MiB.
    rss = [50e6 * (1 + 0.01 * ((i % 3) - 1)) for i in range(121)]
    verdict = flatness("rss", series(rss))
    assert verdict["flat"] and not verdict["monotonic_growth"]
    assert len(verdict["window_maxima"]) == 10
    assert verdict["first_window_max"] == verdict["last_window_max"]


def test_slow_steady_growth_is_not_flat_even_within_the_tolerance() -> None:
    # One fd more every minute: the end stays within the slack, the trend does not.
    fds = [100 + i // 12 for i in range(121)]
    verdict = flatness("fds", series(fds))
    assert verdict["last_window_max"] - verdict["first_window_max"] <= verdict["allowed_growth"]
    assert verdict["monotonic_growth"] and not verdict["flat"]


def test_a_jump_beyond_the_tolerance_is_not_flat() -> None:
    threads = [28] * 60 + [40] * 61
    verdict = flatness("threads", series(threads))
    assert not verdict["monotonic_growth"] and not verdict["flat"]


def test_short_runs_use_quarters_and_the_summary_keys_on_the_test() -> None:
    figures: list[dict[str, Any]] = [
        {"test": "t.py::load", "name": "daemon_usage", "value": v, "labels": {"what": "fds",
         "t": str(t)}}
        for t, v in series([18, 80, 84, 79, 82, 85, 81, 83, 80], step=2.5)
    ]  # fmt: skip
    summary = usage_summary(figures)
    fds = summary["t.py::load"]["fds"]
    assert fds["window"] == 5.0 and fds["samples"] == 9
    assert fds["flat"], fds  # the ramp at t=0 is within the first window's maximum


def test_suite_rows_show_a_modules_figures_with_units() -> None:
    figures = [
        {"test": "tests/hardening/test_request_cost.py::test_x", "name": "refused_plug_seconds",
         "value": 0.0042, "labels": {"size": str(1 << 50), "threads": "0"}},
        {"test": "tests/hardening/test_request_cost.py::test_x", "name": "attack", "value": 1,
         "labels": {}},
        {"test": "tests/hardening/test_load.py::test_y", "name": "load_fds", "value": 3,
         "labels": {}},
    ]  # fmt: skip
    rows = suite_rows(figures, "test_request_cost")
    assert rows == [["refused plug: latency", "size=1.0 PiB, threads=0", "4.2 ms", "`test_x`"]]
