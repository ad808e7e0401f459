"""The benchmark's one place for medians and percentiles, and its markdown tables."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from bench.report import Section, Table, Target, fmt_ratio, fmt_time, render
from bench.stats import Result, interleave, median, percentile, repeat


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert median(values) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)
    assert median([7.0]) == 7.0
    assert math.isnan(median([]))


def test_repeat_discards_the_warm_up_and_resets_after_every_run() -> None:
    runs = iter([9.0, 1.0, 2.0, 3.0])
    resets: list[int] = []
    samples = repeat(lambda: next(runs), reps=3, reset=lambda: resets.append(1))
    assert samples == [1.0, 2.0, 3.0]
    assert len(resets) == 4
    assert Result("k", samples).median == 2.0


def test_interleave_takes_turns_and_resets_each_run_before_the_next() -> None:
    log: list[str] = []

    def run(key: str) -> tuple[Callable[[], float], Callable[[], object]]:
        def timed() -> float:
            log.append(key)
            return float(log.count(key))

        return timed, lambda: log.append(f"reset {key}")

    samples = interleave({"a": run("a"), "b": run("b")}, reps=2)
    assert log == ["a", "reset a", "b", "reset b"] * 3
    # The first turn is the warm-up: discarded for every run alike.
    assert samples == {"a": [2.0, 3.0], "b": [2.0, 3.0]}


def test_tables_and_targets_render_as_markdown() -> None:
    table = Table(("what", "median"))
    table.add("x", fmt_time(0.2261))
    with pytest.raises(ValueError, match="columns"):
        table.add("only one cell")
    section = Section("s", "A section", tables=[table])
    section.targets.append(Target("x ≥ 0.95x y", fmt_ratio(1.0), True))
    section.targets.append(Target("z", "not measured", None))
    text = render([("kernel", "6.18")], [section], quick=False)
    assert "| x | 226 ms |" in text
    assert "| A section | x ≥ 0.95x y | 1.00x | **PASS** |" in text
    assert "| A section | z | not measured | n/a |" in text
    assert "QUICK RUN" not in text
