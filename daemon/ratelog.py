"""Log lines that a client can repeat at will, without letting it fill the disk.

A hostile or broken client can make the daemon meet the same event thousands
of times a second (a refused request, a shed connection, a full fd table).
RateLimitedLog lets the first few of each kind through per interval and then
counts the rest; the next line of that kind says how many were held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

MAX_KEYS: Final = 1024  # kinds remembered at once; the oldest are forgotten first


@dataclass
class _Window:
    start: float
    logged: int = 0
    held_back: int = 0


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds for each key (e.g. an event and a uid)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log msg % args unless this key used up its burst; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(key)
        held_back = 0
        if window is None or now - window.start >= self.interval:
            held_back = window.held_back if window is not None else 0
            self._windows.pop(key, None)
            window = self._windows[key] = _Window(now)
            if len(self._windows) > MAX_KEYS:
                del self._windows[next(iter(self._windows))]
        if window.logged >= self.burst:
            window.held_back += 1
            return False
        window.logged += 1
        if held_back:
            msg += " (%d more like this held back in the previous %.0f s)"
            args = (*args, held_back, self.interval)
        self.logger.log(level, msg, *args)
        return True

    def debug(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
