"""The daemon's fds, threads and RSS sampled from /proc every few seconds while a test runs.

Each sample is recorded as a figure (`daemon_usage`, labels what=fds|threads|rss
and t=seconds since the start), so bench/reliability.py can show the series and
say whether it stayed flat over a long load (`make reliability
RELIABILITY_ARGS="--soak 600"`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

from hardening_kit import fd_count, record, rss_bytes

SAMPLE_SECONDS_ENV = "MEMPLUG_SAMPLE_SECONDS"


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise LookupError(f"no Threads: for pid {pid}")


class UsageSampler:
    """A thread sampling pid every `interval` seconds until the with-block ends;
    `samples` keeps (seconds, fds, threads, rss bytes) for the test itself."""

    def __init__(self, pid: int, interval: float | None = None) -> None:
        self.pid = pid
        self.interval = interval or float(os.environ.get(SAMPLE_SECONDS_ENV, "5"))
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
        self._start = 0.0

    def __enter__(self) -> UsageSampler:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sample()  # the last point: the state at the end of the load

    def sample(self) -> None:
        try:
            point = (
                round(time.monotonic() - self._start, 1),
                fd_count(self.pid),
                threads_of(self.pid),
                rss_bytes(self.pid),
            )
        except (OSError, LookupError):
            return  # the daemon is gone: the test's own checks say so
        self.samples.append(point)
        t = str(point[0])
        record("daemon_usage", point[1], what="fds", t=t)
        record("daemon_usage", point[2], what="threads", t=t)
        record("daemon_usage", point[3], what="rss", t=t)

    def _run(self) -> None:
        self.sample()
        while not self._stop.wait(self.interval):
            self.sample()
