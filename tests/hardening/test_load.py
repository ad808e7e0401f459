"""Load: 16 clients at once, for a bounded time, doing everything at random.

Each client is a thread with its own Client (its own gRPC channel) and owns
the regions it creates: only the owner creates, plugs, unplugs, discards,
writes and deletes them, so it always knows what exists and what is plugged.
Every client also reads the others' regions (get, populate, read-only attach),
which puts them in range locks and makes deletes meet busy regions. Regions
are small: shmem mostly, some hugetlb from an 8-page pool, some FILE regions
on a 48 MiB tmpfs; the daemon has a 160 MiB quota, so all three run out now
and then. About one request in ten is invalid on purpose and must be refused
with the code that says why.

Afterwards (the baseline is taken after a warm-up round, with no regions and
no clients): no fds leaked in the daemon, RSS within max(10 %, 8 MiB), the
hugetlb pool and the tmpfs back to empty, the store consistent with the
kernel, ListRegions equal to what the clients believe exists, and every
operation either succeeded or failed with a documented code.

MEMPLUG_LOAD_SECONDS changes the measured round (default 60 s); the daemon's
fds, threads and RSS are sampled every MEMPLUG_SAMPLE_SECONDS (default 5 s)
meanwhile, for the report (`make reliability RELIABILITY_ARGS="--soak 600"`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import HUGE_2M, DaemonProcess, MiB, huge_free, used_bytes
from hardening_kit import (
    DOCUMENTED_CODES,
    alive,
    fd_count,
    leak_check,
    record,
    rss_bytes,
    wait_until,
)
from usage_sampler import UsageSampler

from memplug.client import Client, MemplugError, Region
from memplug.common import memory

Factory = Callable[..., DaemonProcess]

pytestmark = [pytest.mark.privileged, pytest.mark.slow]

CLIENTS = 16
LOAD_SECONDS = float(os.environ.get("MEMPLUG_LOAD_SECONDS", "60"))
WARMUP_SECONDS = max(2.0, min(6.0, LOAD_SECONDS / 10))
POOL_PAGES = 8
QUOTA = "160M"
ALLOW_TMPFS = "48M"
BLOCK = 2 * MiB
MAX_OWNED = 4
FD_SLACK = 4  # gRPC may keep a connection or a wake-up fd more than at the baseline
RSS_SLACK = 8 * MiB  # or 10 % of the baseline, whichever is larger
INVALID_RATE = 0.1


@dataclass
class Owned:
    backing: str
    size: int
    path: str = ""


@dataclass
class Shared:
    """What the clients believe exists, and the tallies."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    live: set[str] = field(default_factory=set)
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)

    def pick(self, rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(sorted(self.live)) if self.live else None


class Worker(threading.Thread):
    def __init__(
        self, index: int, d: DaemonProcess, allow: Path, shared: Shared, until: float, seed: int
    ) -> None:
        super().__init__(name=f"load-{index}", daemon=True)
        self.index = index
        self.allow = allow
        self.shared = shared
        self.until = until
        self.rng = random.Random(seed)
        self.client = Client(d.socket, timeout=60)
        self.owned: dict[str, Owned] = {}
        self.counter = 0
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.problems: list[str] = []

    # ------------------------------------------------------------------ bookkeeping

    def attempt(self, op: str, fn: Callable[[], Any], invalid: frozenset[str] = frozenset()) -> Any:
        """Run one operation; tally its outcome. `invalid`: the codes a deliberately
        invalid request may get (it must get one of them)."""
        tag = f"{op}(invalid)" if invalid else op
        try:
            result = fn()
        except MemplugError as exc:
            code = exc.code or f"client-side {type(exc).__name__}"
            self.outcomes[(tag, code)] += 1
            if code not in DOCUMENTED_CODES:
                self.problems.append(f"{tag}: undocumented code {code}: {exc.message}")
            elif invalid and code not in invalid:
                self.problems.append(f"{tag}: {code} (want one of {sorted(invalid)}): {exc}")
            return None
        except Exception as exc:  # anything else is a client or daemon bug
            self.outcomes[(tag, f"exception {type(exc).__name__}")] += 1
            self.problems.append(f"{tag}: {type(exc).__name__}: {exc}")
            return None
        self.outcomes[(tag, "OK")] += 1
        if invalid:
            self.problems.append(f"{tag}: an invalid request succeeded")
        return result if result is not None else True

    def run(self) -> None:
        ops: list[tuple[Callable[[], None], int]] = [
            (self.create, 10),
            (self.plug, 20),
            (self.populate, 8),
            (self.unplug, 14),
            (self.discard, 8),
            (self.attach_write_read, 12),
            (self.delete, 6),
            (self.cross, 14),
            (self.look, 4),
        ]
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        try:
            while time.monotonic() < self.until:
                self.rng.choices(funcs, weights)[0]()
        finally:
            self.client.close()

    def mine(self) -> tuple[str, Owned] | None:
        if not self.owned:
            return None
        name = self.rng.choice(sorted(self.owned))
        return name, self.owned[name]

    def span(self, size: int) -> tuple[int, int]:
        blocks = size // BLOCK
        start = self.rng.randrange(blocks)
        count = self.rng.randint(1, blocks - start)
        return start * BLOCK, count * BLOCK

    def bad_span(self, size: int) -> tuple[tuple[int, int], frozenset[str]]:
        kind = self.rng.randrange(3)
        if kind == 0:
            return (4096, BLOCK), frozenset({"INVALID_ARGUMENT"})
        if kind == 1:
            return (size, BLOCK), frozenset({"OUT_OF_RANGE"})
        return (0, 4096), frozenset({"INVALID_ARGUMENT"})  # (length 0 means "to the end")

    # ------------------------------------------------------------------ operations

    def create(self) -> None:
        c = self.client
        if self.rng.random() < INVALID_RATE:
            case = self.rng.randrange(5)
            if case == 0:
                self.attempt("create", lambda: c.create_region("Bad Name!", BLOCK), _INVALID)
            elif case == 1:
                self.attempt("create", lambda: c.create_region(self.fresh(), 3 * MiB), _INVALID)
            elif case == 2:
                self.attempt(
                    "create",
                    lambda: c.create_region(self.fresh(), BLOCK, "hugetlb", page_size=12345),
                    _INVALID,
                )
            elif case == 3:
                self.attempt(
                    "create",
                    lambda: c.create_region(self.fresh(), BLOCK, "file", path="../escape.img"),
                    frozenset({"PERMISSION_DENIED"}),
                )
            elif self.owned:
                taken = self.rng.choice(sorted(self.owned))
                self.attempt(
                    "create", lambda: c.create_region(taken, BLOCK), frozenset({"ALREADY_EXISTS"})
                )
            return
        if len(self.owned) >= MAX_OWNED:
            return
        name = self.fresh()
        roll = self.rng.random()
        if roll < 0.7:
            owned = Owned("shmem", self.rng.randint(1, 8) * BLOCK)
            made = self.attempt("create", lambda: c.create_region(name, owned.size))
        elif roll < 0.8:
            owned = Owned("hugetlb", self.rng.randint(1, 4) * BLOCK)
            made = self.attempt(
                "create", lambda: c.create_region(name, owned.size, "hugetlb", page_size=HUGE_2M)
            )
        else:
            owned = Owned("file", self.rng.randint(1, 8) * BLOCK, f"{name}.img")
            made = self.attempt(
                "create", lambda: c.create_region(name, owned.size, "file", path=owned.path)
            )
        if made:
            self.owned[name] = owned
            with self.shared.lock:
                self.shared.live.add(name)

    def fresh(self) -> str:
        self.counter += 1
        return f"w{self.index}-{self.counter}"

    def ranged(self, op: str, call: Callable[[str, int, int], Any]) -> None:
        pick = self.mine()
        if pick is None:
            return
        name, owned = pick
        if self.rng.random() < INVALID_RATE:
            if self.rng.random() < 0.25:
                self.attempt(op, lambda: call(f"w{self.index}-nope", 0, BLOCK), _NOT_FOUND)
                return
            (offset, length), codes = self.bad_span(owned.size)
            self.attempt(op, lambda: call(name, offset, length), codes)
            return
        offset, length = self.span(owned.size)
        self.attempt(op, lambda: call(name, offset, length))

    def plug(self) -> None:
        strategy = self.rng.choice(["auto", "auto", "fallocate", "populate-write"])
        self.ranged("plug", lambda n, o, ln: self.client.plug(n, o, ln, strategy=strategy))

    def populate(self) -> None:
        mode = self.rng.choice(["read", "write"])
        self.ranged("populate", lambda n, o, ln: self.client.populate(n, o, ln, mode=mode))

    def unplug(self) -> None:
        self.ranged("unplug", self.client.unplug)

    def discard(self) -> None:
        self.ranged("discard", self.client.discard)

    def attach_write_read(self) -> None:
        """Write into a plugged block through one attach, read it back through another."""
        pick = self.mine()
        if pick is None:
            return
        name, _ = pick
        region: Region | None = self.attempt("get", lambda: self.client.get_region(name))
        if region is None:
            return
        if not region.plugged:
            self.attempt("attach", lambda: self.client.attach(name, "ro", sparse=True).close())
            return
        offset, length = self.rng.choice(region.plugged)
        page = region.page_size
        at = offset + self.rng.randrange(length // page) * page
        data = self.rng.randbytes(4096)

        def write_read() -> None:
            with self.client.attach(name, sparse=True) as att:
                assert att.view is not None
                att.view[at : at + len(data)] = data
                if bytes(att.view[at : at + len(data)]) != data:
                    self.problems.append(f"{name}: read back other bytes than written at {at}")
            with self.client.attach(name, "ro", sparse=True) as again:
                assert again.view is not None
                if bytes(again.view[at : at + len(data)]) != data:
                    self.problems.append(f"{name}: a second attach sees other bytes at {at}")

        self.attempt("attach+write+read", write_read)

    def delete(self) -> None:
        pick = self.mine()
        if pick is None:
            return
        name, owned = pick
        if self.rng.random() < INVALID_RATE:
            self.attempt("delete", lambda: self.client.delete_region(f"{name}-gone"), _NOT_FOUND)
            return
        if self.attempt("delete", lambda: self.client.delete_region(name)):
            del self.owned[name]
            with self.shared.lock:
                self.shared.live.discard(name)
            if owned.path:
                os.unlink(self.allow / owned.path)  # a FILE region's file stays: ours to remove

    def cross(self) -> None:
        """Read-only work on anyone's region (it may be deleted under us: NOT_FOUND)."""
        name = self.shared.pick(self.rng)
        if name is None:
            return
        c = self.client
        kind = self.rng.randrange(3)
        if kind == 0:
            self.attempt("cross get", lambda: c.get_region(name))
        elif kind == 1:

            def populate_read() -> None:
                region = c.get_region(name)
                offset, length = self.span(region.size)
                c.populate(name, offset, length, mode="read")

            self.attempt("cross populate", populate_read)
        else:
            self.attempt(
                "cross attach", lambda: c.attach(name, "ro", map_memory=False, sparse=True).close()
            )

    def look(self) -> None:
        if self.rng.random() < 0.5:
            self.attempt("list", self.client.list_regions)
        else:
            self.attempt("status", self.client.status)


_INVALID = frozenset({"INVALID_ARGUMENT"})
_NOT_FOUND = frozenset({"NOT_FOUND"})


def run_round(d: DaemonProcess, allow: Path, seconds: float, seed: int) -> Shared:
    shared = Shared()
    until = time.monotonic() + seconds
    workers = [Worker(i, d, allow, shared, until, seed * 100 + i) for i in range(CLIENTS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 120)
        assert not w.is_alive(), f"{w.name} is stuck"
    for w in workers:
        shared.outcomes.update(w.outcomes)
        shared.problems.extend(w.problems)
    return shared


def check_store(d: DaemonProcess, believed: set[str]) -> int:
    """The daemon's regions are the ones the clients believe in, each consistent."""
    with Client(d.socket) as c:
        regions = c.list_regions()
        status = c.status()
    got = {r.name for r in regions}
    assert got == believed, f"ListRegions has {sorted(got - believed)} too many, " + (
        f"{sorted(believed - got)} missing"
    )
    for r in regions:
        assert r.plugged == sorted(r.plugged), f"{r.name}: plugged ranges out of order"
        for (o1, n1), (o2, _) in zip(r.plugged, r.plugged[1:], strict=False):
            assert o1 + n1 < o2, f"{r.name}: plugged ranges overlap or are not merged"
        for offset, length in r.plugged:
            assert offset % r.block_size == 0 and length % r.block_size == 0 and length > 0, (
                f"{r.name}: plugged range ({offset}, {length}) not block-aligned"
            )
            assert offset + length <= r.size
        assert r.plugged_bytes == sum(n for _, n in r.plugged)
        assert r.allocated_bytes >= r.plugged_bytes, (
            f"{r.name} ({r.backing}): {r.allocated_bytes} bytes allocated for "
            f"{r.plugged_bytes} plugged: plugged memory is not backed"
        )
        assert r.allocated_bytes == r.plugged_bytes, (
            f"{r.name} ({r.backing}): {r.allocated_bytes} bytes allocated for "
            f"{r.plugged_bytes} plugged: a rollback left memory behind"
        )
    assert status.regions == len(regions)
    assert status.plugged_bytes == sum(r.plugged_bytes for r in regions)
    return len(regions)


def clean_up(d: DaemonProcess, allow: Path) -> None:
    with Client(d.socket) as c:
        for r in c.list_regions():
            c.delete_region(r.name)
            if r.backing == "file":
                Path(r.path).unlink()


def memfds_of(pid: int) -> list[str]:
    """The region memfds a process still has open or mapped."""
    held = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(entry)
            if target.startswith("/memfd:memplug:"):
                held.append(f"fd {entry.name}: {target}")
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/memfd:memplug:" in line:
            held.append(f"mapping {line.split(maxsplit=5)[-1]}")
    return held


def settle_fds(pid: int, want: int) -> int:
    """Closed clients' connections go away asynchronously: wait (bounded) for it."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: fd_count(pid) <= want, 15, f"memplugd's fds to drop to {want}")
    return fd_count(pid)


def test_sixteen_clients_at_random(
    daemon_factory: Factory,
    hugetlb_pool: Callable[[int], None],
    small_tmpfs: Callable[[str], Path],
) -> None:
    hugetlb_pool(POOL_PAGES)
    allow = small_tmpfs(ALLOW_TMPFS)
    d = daemon_factory("--allow-dir", str(allow), "--max-bytes", QUOTA)
    pid = d.proc.pid

    warm = run_round(d, allow, WARMUP_SECONDS, seed=1)
    assert not warm.problems, "\n".join(warm.problems[:30])
    clean_up(d, allow)
    time.sleep(1)
    base_fds = settle_fds(pid, fd_count(pid))
    base_rss = rss_bytes(pid)
    base_used = used_bytes(allow)

    with UsageSampler(pid):  # the series the report checks for growth (--soak)
        shared = run_round(d, allow, LOAD_SECONDS, seed=int(time.time()))
    alive(d)
    total = sum(shared.outcomes.values())
    for (op, outcome), n in sorted(shared.outcomes.items()):
        record("load_ops", n, op=op, outcome=outcome)
    record("load_seconds", LOAD_SECONDS)
    record("load_clients", CLIENTS)
    regions_left = check_store(d, shared.live)
    record("load_regions_checked", regions_left)

    clean_up(d, allow)
    fds = settle_fds(pid, base_fds + FD_SLACK)
    rss = rss_bytes(pid)
    record("load_fds", fds, phase="after")
    record("load_fds", base_fds, phase="baseline")
    record("load_rss", rss, phase="after")
    record("load_rss", base_rss, phase="baseline")
    slack = max(RSS_SLACK, base_rss // 10)
    leak_check("daemon fds after load", max(0, fds - base_fds), "fds", FD_SLACK)
    leak_check("daemon RSS after load", max(0, rss - base_rss), tolerance=slack)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: huge_free() == POOL_PAGES, 10, "the hugetlb pool to be free again")
    pool = memory.huge_pool(HUGE_2M)
    leak_check("hugetlb pages after load", POOL_PAGES - pool.free, "pages")
    leak_check("allow-dir tmpfs after load", used_bytes(allow) - base_used)
    held = memfds_of(pid)
    leak_check("memfds still open or mapped in the daemon", len(held), "memfds")

    report = "\n".join(f"  {op:28} {outcome:22} {n}" for (op, outcome), n in
                       sorted(shared.outcomes.items()))  # fmt: skip
    assert not shared.problems, (
        f"{len(shared.problems)} problems:\n"
        + "\n".join(shared.problems[:40])
        + f"\noutcomes:\n{report}"
    )
    assert total >= CLIENTS * LOAD_SECONDS, f"only {total} operations in {LOAD_SECONDS} s"
    ok = sum(n for (_, outcome), n in shared.outcomes.items() if outcome == "OK")
    assert ok >= total // 4, f"only {ok} of {total} operations succeeded:\n{report}"
    assert fds <= base_fds + FD_SLACK, f"memplugd holds {fds} fds, {base_fds} at the baseline"
    assert rss <= base_rss + slack, (
        f"memplugd's RSS grew from {base_rss >> 20} MiB to {rss >> 20} MiB under load"
    )
    assert not held, f"memplugd still holds memfds of deleted regions: {held}"
    assert pool.free == POOL_PAGES, (
        f"{POOL_PAGES - pool.free} huge pages not back in the pool after every region was "
        f"deleted (pool: {pool})"
    )
    assert used_bytes(allow) == base_used


CHURN_SECONDS = float(os.environ.get("MEMPLUG_CHURN_SECONDS", "8"))


def test_reads_during_create_delete_churn(daemon_factory: Factory) -> None:
    """GetStatus and ListRegions while other clients create and delete regions
    as fast as they can: a region deleted between a reader's snapshot of the region
    table and its look at the region's fd must not turn the read into INTERNAL."""
    d = daemon_factory()
    until = time.monotonic() + CHURN_SECONDS
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()

    def tally(op: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            code = "OK"
        except MemplugError as exc:
            code = exc.code or type(exc).__name__
        with lock:
            outcomes[(op, code)] += 1

    def churn(index: int) -> None:
        """Keep 16 regions alive, always deleting the oldest: readers walk 64 at a time."""
        with Client(d.socket) as c:
            live: collections.deque[str] = collections.deque()
            n = 0
            while time.monotonic() < until:
                n += 1
                fresh = f"churn{index}-{n}"
                tally("create", functools.partial(c.create_region, fresh, BLOCK))
                live.append(fresh)
                if len(live) > 16:
                    tally("delete", functools.partial(c.delete_region, live.popleft()))

    def read(index: int) -> None:
        with Client(d.socket) as c:
            while time.monotonic() < until:
                for _ in range(3):
                    tally("status", c.status)
                tally("list", c.list_regions)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CHURN_SECONDS + 60)
    alive(d)
    for (op, code), n in sorted(outcomes.items()):
        record("churn_ops", n, op=op, outcome=code)
    bad = {k: n for k, n in outcomes.items() if k[1] not in DOCUMENTED_CODES | {"OK"}}
    assert not bad, f"undocumented answers while regions came and went: {bad}\n{dict(outcomes)}"
    assert outcomes[("delete", "OK")] > 100, dict(outcomes)
