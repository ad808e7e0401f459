"""Samples and their summaries: the single place that computes medians and percentiles."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass
class Result:
    """One measured figure: every sample (seconds, bytes or ops/s) and what it was.

    key is stable across runs (it names the figure in --json output); meta
    holds what the reader needs to reproduce it (size, threads, method).
    """

    key: str
    samples: list[float]
    unit: str = "s"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50.0)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99.0)

    @property
    def minimum(self) -> float:
        return min(self.samples) if self.samples else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "n": len(self.samples),
            "median": self.median,
            "p99": self.p99,
            "min": self.minimum,
            "max": max(self.samples) if self.samples else math.nan,
            "samples": self.samples,
            **self.meta,
        }


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn() took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(
    run: Callable[[], float],
    *,
    reps: int,
    reset: Callable[[], object] | None = None,
    warmup: int = 1,
) -> list[float]:
    """Samples of run() (which returns the seconds it measured), after `warmup` discarded runs.

    reset() runs after every run, untimed, so that each repetition starts from
    an empty range (punch the hole, unplug, close the mapping).
    """
    return interleave({"": (run, reset or _nothing)}, reps=reps, warmup=warmup)[""]


def _nothing() -> None:
    pass


Run = tuple[Callable[[], float], Callable[[], object]]  # (timed run, untimed reset)


def interleave(runs: dict[str, Run], *, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Samples of every run, taken in turns: repetition i of each, then i + 1 of each.

    Against the drift of a shared VM (the raw path measured at a quiet moment,
    memplug at a busy one), taking the figures a ratio compares side by side.
    """
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for i in range(warmup + reps):
        for key, (run, reset) in runs.items():
            seconds = run()
            reset()
            if i >= warmup:
                samples[key].append(seconds)
    return samples
