"""One-time attach tickets: issued over gRPC, redeemed on the fd socket."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from memplug.common.errors import NotFound, PermissionDenied, ResourceExhausted
from memplug.daemon.engine.region import Access

TICKET_BYTES = 24  # 192 random bits
MAX_OUTSTANDING = 4096


@dataclass(frozen=True)
class Peer:
    """The process on the other end of the fd socket, as SO_PEERCRED tells it."""

    pid: int
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class Handoff:
    """What a redeemed ticket yields: a fresh fd (the receiver closes it) and its facts."""

    fd: int
    region: str
    size: int
    page_size: int
    block_size: int
    backing: str
    access: Access
    seals: int
    plugged_bytes: int  # at the hand-off: size means every block is plugged


@dataclass(frozen=True)
class Ticket:
    value: str
    region: str
    access: Access
    expires: float  # time.monotonic()


class TicketBook:
    """Bearer tickets: single use, short-lived, bounded in number.

    Possession of a ticket is not enough: the fd socket also checks the
    redeeming process's credentials against the region's ACL.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}
        self._revoked: dict[str, Ticket] = {}  # tickets of deleted regions, until they expire

    def issue(self, region: str, access: Access) -> Ticket:
        now = time.monotonic()
        with self._lock:
            self._sweep(now)
            if len(self._tickets) >= MAX_OUTSTANDING:
                raise ResourceExhausted(
                    f"{MAX_OUTSTANDING} attach tickets are outstanding; redeem or let them "
                    f"expire ({self.ttl:g} s)"
                )
            ticket = Ticket(secrets.token_urlsafe(TICKET_BYTES), region, access, now + self.ttl)
            self._tickets[ticket.value] = ticket
        return ticket

    def redeem(self, value: str) -> Ticket:
        """Take the ticket out of the book; it can never be used again."""
        with self._lock:
            ticket = self._tickets.pop(value, None)
            revoked = self._revoked.pop(value, None)
        if revoked is not None:
            raise NotFound(f"region {revoked.region!r} was deleted after this ticket was issued")
        if ticket is None:
            raise PermissionDenied("unknown ticket: it was never issued or is already used")
        if time.monotonic() > ticket.expires:
            raise PermissionDenied(f"ticket expired (tickets live {self.ttl:g} s)")
        return ticket

    def revoke_region(self, region: str) -> None:
        """A deleted region's tickets answer NOT_FOUND, never a new region of that name."""
        with self._lock:
            for value in [v for v, t in self._tickets.items() if t.region == region]:
                self._revoked[value] = self._tickets.pop(value)

    def _sweep(self, now: float) -> None:
        for book in (self._tickets, self._revoked):
            for value in [v for v, t in book.items() if t.expires < now]:
                del book[value]
