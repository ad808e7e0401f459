"""Cancellation and deadlines for long operations."""

from __future__ import annotations

import threading
import time

from memplug.common.errors import Cancelled, DeadlineExceeded


class CancelToken:
    """Set by whoever gives up on an operation: the client, a deadline, shutdown.

    Workers call check() between chunks; it raises Cancelled or
    DeadlineExceeded, after which the operation rolls back.
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() value, or None
        self._event = threading.Event()
        self._reason = ""

    def cancel(self, reason: str = "cancelled by the client") -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self._reason)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded("deadline exceeded")

    def wait(self, timeout: float) -> bool:
        """Sleep up to timeout (cut short by the deadline); True if cancelled."""
        remaining = self.remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining))
        return self._event.wait(timeout)
