"""Per-suite figure tables and the daemon's usage over a load (flat or growing), for
bench/reliability.py. Everything here is computed from the recorded figures."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from typing import Any, Final

# What a figure means and how its value reads; a figure not listed is shown by its name.
# unit: count, rate (0..1), cores, bytes, seconds, plain.
DESCRIPTIONS: Final[dict[str, tuple[str, str]]] = {
    "fd_flood_success_rate": ("other uid's OPENs served during the flood", "rate"),
    "fd_flood_daemon_cpu": ("daemon CPU during the flood", "cores"),
    "fd_flood_daemon_fds": ("daemon fds", "count"),
    "fd_flood_daemon_threads": ("daemon threads", "count"),
    "fd_flood_reconnects": ("flooder's connections (reconnecting as shed)", "count"),
    "fd_flood_low_nofile_daemon_cpu": ("RLIMIT_NOFILE 1024: daemon CPU, flood alone", "cores"),
    "fd_flood_low_nofile_log_bytes": ("RLIMIT_NOFILE 1024: log written by the flood", "bytes"),
    "fd_flood_low_nofile_daemon_fds": ("RLIMIT_NOFILE 1024: daemon fds", "count"),
    "fd_flood_low_nofile_daemon_threads": ("RLIMIT_NOFILE 1024: daemon threads", "count"),
    "fd_flood_low_nofile_success_rate": ("RLIMIT_NOFILE 1024: other OPENs served", "rate"),
    "fd_unread_other_uid_success_rate": ("unread replies: other uid's OPENs served", "rate"),
    "fd_unread_hoarder_fds": ("unread replies: fds the hoarding uid got", "count"),
    "fd_unread_daemon_fds": ("unread replies: daemon fds", "count"),
    "metrics_abuse_threads": ("400 idle metrics connections: daemon threads", "count"),
    "metrics_abuse_fds": ("400 idle metrics connections: daemon fds", "count"),
    "state_full_refused": ("full state dir: mutating RPCs refused", "count"),
    "state_full_retried": ("full state dir: the same RPCs served once space is back", "count"),
    "refused_plug_seconds": ("refused plug: latency", "seconds"),
    "refused_plug_rss_growth": ("refused plug: daemon RSS growth", "bytes"),
    "holder_check": ("holder check held (1: yes, 0: no)", "count"),
    "holder_allocated_outside_plugged": ("memory a holder allocated, counted", "bytes"),
    "charge_consumer_bytes": ("plugged bytes charged to the consumer's cgroup", "bytes"),
    "charge_daemon_bytes": ("daemon's own cgroup growth meanwhile", "bytes"),
    "charge_refused_left_bytes": ("charged after a plug refused by the cgroup limit", "bytes"),
    "charge_oom_kills": ("OOM kills in the consumer's cgroup (the helper)", "count"),
}
# Figures the generic tables leave to sections of their own.
SHOWN_ELSEWHERE: Final = frozenset(
    {"attack", "fault", "leak", "daemon_usage", "load_ops", "ticket_guesses", "bytes_checked"}
)
LABEL_BYTES: Final = frozenset({"size"})


def size(n: float) -> str:
    for unit, scale in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):  # fmt: skip
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def value_text(value: float, unit: str) -> str:
    if unit == "rate":
        return f"{value * 100:.1f} %"
    if unit == "cores":
        return f"{value:.2f} cores"
    if unit == "bytes":
        return size(value)
    if unit == "seconds":
        return f"{value * 1e3:.1f} ms"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def labels_text(labels: dict[str, str]) -> str:
    parts = []
    for key, value in sorted(labels.items()):
        if key == "unit":
            continue
        shown = size(int(value)) if key in LABEL_BYTES and value.isdigit() else value
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def module_of(test: str) -> str:
    return test.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def suite_rows(figures: Iterable[dict[str, Any]], module: str) -> list[list[str]]:
    """One row per figure the module's tests recorded: what, labels, value, test."""
    rows = []
    for f in figures:
        if module_of(f["test"]) != module or f["name"] in SHOWN_ELSEWHERE:
            continue
        what, unit = DESCRIPTIONS.get(f["name"], (f["name"], "plain"))
        test = f["test"].split("::", 1)[-1]
        rows.append([what, labels_text(f["labels"]), value_text(f["value"], unit), f"`{test}`"])
    return rows


# --------------------------------------------------------------------------- usage over time

# Flat: the last window's maximum within these of the first window's maximum, and
# the per-window maxima not rising window after window (monotonic growth).
FLAT_TOLERANCE: Final[dict[str, tuple[float, float]]] = {
    # what: (relative, absolute). Every live region holds an fd and the random load
    # keeps a varying number alive, so fds get more room than threads and RSS.
    "fds": (0.10, 8),
    "threads": (0.05, 2),
    "rss": (0.05, 0),
}
WINDOW_SECONDS: Final = 60.0


def usage_series(figures: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """test -> what -> [[seconds, value], ...] from the daemon_usage samples."""
    out: dict[str, dict[str, list[list[float]]]] = collections.defaultdict(dict)
    for f in figures:
        if f["name"] == "daemon_usage":
            series = out[f["test"]].setdefault(f["labels"]["what"], [])
            series.append([float(f["labels"]["t"]), float(f["value"])])
    for by_what in out.values():
        for series in by_what.values():
            series.sort()
    return dict(out)


def flatness(what: str, series: list[list[float]]) -> dict[str, Any]:
    """Summary of one series and whether it stayed flat (see FLAT_TOLERANCE)."""
    duration = series[-1][0]
    window = max(min(WINDOW_SECONDS, duration / 4), 1e-9)
    maxima: list[float] = []
    for t, v in series:
        index = min(int(t // window), max(int(duration // window) - 1, 0))
        while len(maxima) <= index:
            maxima.append(float("-inf"))
        maxima[index] = max(maxima[index], v)
    maxima = [m for m in maxima if m != float("-inf")]
    first, last = maxima[0], maxima[-1]
    relative, absolute = FLAT_TOLERANCE.get(what, (0.05, 0))
    allowed = max(first * relative, absolute)
    rising = len(maxima) >= 3 and all(b > a for a, b in itertools.pairwise(maxima))
    values = [v for _, v in series]
    return {
        "samples": len(series),
        "seconds": duration,
        "window": window,
        "first": values[0],
        "last": values[-1],
        "min": min(values),
        "max": max(values),
        "window_maxima": maxima,
        "first_window_max": first,
        "last_window_max": last,
        "allowed_growth": allowed,
        "monotonic_growth": rising,
        "flat": last <= first + allowed and not rising,
    }


def usage_summary(figures: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    return {
        test: {what: flatness(what, series) for what, series in sorted(by_what.items())}
        for test, by_what in sorted(usage_series(figures).items())
    }


def usage_rows(summary: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for test, by_what in summary.items():
        for what, s in by_what.items():
            unit = "bytes" if what == "rss" else "count"

            def show(v: float, unit: str = unit) -> str:
                return value_text(v, unit)

            verdict = "flat" if s["flat"] else "**GREW**"
            rows.append(
                [
                    what,
                    f"{s['samples']} in {s['seconds']:.0f} s",
                    f"{show(s['first'])} → {show(s['last'])}",
                    f"{show(s['min'])} to {show(s['max'])}",
                    f"{show(s['first_window_max'])} → {show(s['last_window_max'])} "
                    f"(+{show(s['allowed_growth'])} allowed)",
                    " ".join(show(m) for m in s["window_maxima"]),
                    verdict,
                    f"`{test.split('::', 1)[-1]}`",
                ]
            )
    return rows


USAGE_HEADER: Final = [
    "daemon",
    "samples",
    "first → last",
    "min to max",
    "first → last window's max",
    "max per window",
    "verdict",
    "test",
]
