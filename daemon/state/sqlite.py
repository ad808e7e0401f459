"""SQLite state store (stdlib sqlite3, WAL, synchronous=NORMAL).

Schema, version 5:

    meta(key TEXT PRIMARY KEY, value TEXT)             schema_version
    regions(name TEXT PRIMARY KEY, size INTEGER, backing TEXT, page_size INTEGER,
            block_size INTEGER, path TEXT, labels TEXT (JSON object),
            acl TEXT (JSON object, see records.py), created_at REAL,
            plugged TEXT (JSON [[offset, length], ...], merged, ascending),
            gone TEXT (why a restart lost the region; '' while it lives),
            options TEXT (JSON object, see records.py),
            finished_intent INTEGER (v2: the intent the last finish() closed))
    intents(id INTEGER PRIMARY KEY, region TEXT, op TEXT, offset INTEGER,
            length INTEGER, keep TEXT (JSON [[offset, length], ...]), started REAL,
            ranges TEXT (v5: JSON [[offset, length], ...], the list of a multi-range
            call, offset and length then its span; '[]': offset and length alone))
    trigger finish_intent (v2): setting regions.finished_intent deletes that intent
    hugetlb_added(page_size INTEGER, node INTEGER (-1: the kernel-wide pool),
            pages INTEGER) (v3): huge pages the daemon added to a pool (--hugetlb-budget)
    holds(region TEXT, holder TEXT, reason TEXT, expires_at REAL (epoch seconds),
          PRIMARY KEY (region, holder))                   (v4)

Every write is one transaction. In WAL mode with synchronous=NORMAL a commit is
durable against a crash of the daemon before the call returns, a crash rolls
back an unfinished one, and an OS crash can lose only the last commits (the
reconciliation at start-up checks the store against the kernel).
Migrations run in order from the stored version; each has a test.

A write that cannot be committed (full file system, read-only file system, I/O
error) is rolled back and raised as NoSpace (full) or FailedPrecondition
(anything else), naming the state dir: the caller undoes what it did. A row
that cannot be decoded (truncated JSON, wrong types) is loaded as a record
marked gone with why, so one bad row costs one region, not the daemon's start.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from memplug.common.errors import FailedPrecondition, MemplugError, NoSpace
from memplug.common.ranges import Range
from memplug.daemon.state.records import (
    Acl,
    HoldRecord,
    RegionOptions,
    acl_from_json,
    acl_to_json,
    options_from_json,
    options_to_json,
)
from memplug.daemon.state.store import Intent, PoolKey, RegionRecord

SCHEMA_VERSION: Final = 5
SQLITE_FULL: Final = 13  # primary result code: "database or disk is full"


def _v1(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        CREATE TABLE regions (
            name TEXT PRIMARY KEY, size INTEGER NOT NULL, backing TEXT NOT NULL,
            page_size INTEGER NOT NULL, block_size INTEGER NOT NULL, path TEXT NOT NULL,
            labels TEXT NOT NULL, acl TEXT NOT NULL, created_at REAL NOT NULL,
            plugged TEXT NOT NULL DEFAULT '[]', gone TEXT NOT NULL DEFAULT '',
            options TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE intents (
            id INTEGER PRIMARY KEY, region TEXT NOT NULL, op TEXT NOT NULL,
            offset INTEGER NOT NULL, length INTEGER NOT NULL, keep TEXT NOT NULL,
            started REAL NOT NULL
        );
        """
    )


def _v2(db: sqlite3.Connection) -> None:
    # finish() becomes one UPDATE, atomic on its own: the trigger deletes the
    # intent in the same statement. It was BEGIN, UPDATE, DELETE, COMMIT: four
    # executes, each a point where the gRPC threads took the GIL from a small plug.
    db.executescript(
        """
        ALTER TABLE regions ADD COLUMN finished_intent INTEGER;
        CREATE TRIGGER finish_intent AFTER UPDATE OF finished_intent ON regions
        WHEN NEW.finished_intent IS NOT NULL
        BEGIN
            DELETE FROM intents WHERE id = NEW.finished_intent;
        END;
        """
    )


def _v3(db: sqlite3.Connection) -> None:
    # Pages added to hugetlb pools on demand outlive the process that added
    # them: the next daemon must still know they are its to give back.
    db.executescript(
        """
        CREATE TABLE hugetlb_added (
            page_size INTEGER NOT NULL, node INTEGER NOT NULL, pages INTEGER NOT NULL,
            PRIMARY KEY (page_size, node)
        );
        """
    )


def _v4(db: sqlite3.Connection) -> None:
    # Holds on regions (HoldRegion): a restart in the middle of a VMM hand-over
    # must not let the region be unplugged or deleted under it.
    db.executescript(
        """
        CREATE TABLE holds (
            region TEXT NOT NULL, holder TEXT NOT NULL, reason TEXT NOT NULL,
            expires_at REAL NOT NULL, PRIMARY KEY (region, holder)
        );
        """
    )


def _v5(db: sqlite3.Connection) -> None:
    # Plug, Unplug and Discard take a list of ranges in one call, under one
    # intent: a restart must replay exactly those ranges, not the span between
    # them (an unplug of the span would drop blocks the call never named).
    db.executescript(
        """
        ALTER TABLE intents ADD COLUMN ranges TEXT NOT NULL DEFAULT '[]';
        """
    )


MIGRATIONS: Final[list[Callable[[sqlite3.Connection], None]]] = [_v1, _v2, _v3, _v4, _v5]
KERNEL_WIDE_NODE: Final = -1  # hugetlb_added.node of the kernel-wide pool


def _ranges(text: str) -> tuple[Range, ...]:
    pairs = json.loads(text)
    if not isinstance(pairs, list):
        raise ValueError(f"ranges: expected a JSON list, got {text[:40]!r}")
    ranges = []
    for pair in pairs:
        offset, length = pair
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise ValueError(f"range {pair!r} is not two non-negative integers")
        ranges.append(Range(offset, length))
    return tuple(ranges)


def _object(column: str, text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{column}: expected a JSON object, got {text[:40]!r}")
    return value


def _typed(column: str, value: object, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{column}: expected {kind.__name__}, got {value!r}")
    return value


def _record(row: tuple[Any, ...]) -> RegionRecord:
    """A regions row decoded; ValueError (or TypeError) says what is wrong with it."""
    return RegionRecord(
        name=_typed("name", row[0], str),
        size=_typed("size", row[1], int),
        backing=_typed("backing", row[2], str),
        page_size=_typed("page_size", row[3], int),
        block_size=_typed("block_size", row[4], int),
        path=_typed("path", row[5], str),
        labels=_object("labels", row[6]),
        acl=acl_from_json(row[7]),
        created_at=float(row[8]),
        plugged=_ranges(row[9]),
        gone=_typed("gone", row[10], str),
        options=options_from_json(row[11]),
    )


def _malformed(name: str, why: str) -> RegionRecord:
    """Stands in for a row that cannot be decoded: the region is reported lost, with why."""
    return RegionRecord(
        name=name,
        size=0,
        backing="",
        page_size=0,
        block_size=0,
        path="",
        labels={},
        acl=Acl(),
        created_at=0.0,
        gone=f"its record in the state store is malformed ({why}); it is left as it is "
        "in the store for inspection, and creating a region of that name replaces it",
    )


def _dump(ranges: tuple[Range, ...]) -> str:
    return json.dumps([[r.offset, r.length] for r in ranges])


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the daemon crashing (the case
        # that matters: memfd memory does not survive a power loss anyway), and
        # after an OS crash the store is consistent, if a few commits old, which
        # start-up reconciliation repairs against the kernel. FULL fsyncs every
        # commit and doubled the cost of a small plug.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock, self._db:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"state {self.path} has schema {version}, newer than this memplugd "
                    f"({SCHEMA_VERSION}): run a newer memplugd or move the state away"
                )
            for step in MIGRATIONS[version:]:
                step(self._db)
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the lock for one write; a failed one is rolled back and explained."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    # the failed COMMIT may have ended the transaction already
                    with contextlib.suppress(sqlite3.Error):
                        self._db.rollback()
                raise self._write_error(exc) from exc

    def _write_error(self, exc: sqlite3.Error) -> MemplugError:
        where = self.path.parent
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code == SQLITE_FULL or "disk is full" in str(exc):
            return NoSpace(f"the state dir {where} is full ({exc}): free space there, then retry")
        return FailedPrecondition(
            f"the state in {where} cannot be written ({exc}): check that its file system "
            "is writable and healthy (read-only? I/O errors in the kernel log?), then retry"
        )

    def _write(self, sql: str, *args: object) -> None:
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql, args)
            self._db.execute("COMMIT")

    def load(self) -> tuple[list[RegionRecord], list[Intent]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, size, backing, page_size, block_size, path, labels, acl, "
                "created_at, plugged, gone, options FROM regions ORDER BY name"
            ).fetchall()
            intent_rows = self._db.execute(
                "SELECT id, region, op, offset, length, keep, ranges FROM intents ORDER BY id"
            ).fetchall()
        regions: dict[str, RegionRecord] = {}
        for row in rows:
            name = str(row[0])
            try:
                regions[name] = _record(row)
            except (ValueError, TypeError) as exc:
                regions[name] = _malformed(name, f"{type(exc).__name__}: {exc}")
        intents = []
        for row in intent_rows:
            try:
                intents.append(
                    Intent(
                        _typed("id", row[0], int),
                        _typed("region", row[1], str),
                        _typed("op", row[2], str),
                        Range(_typed("offset", row[3], int), _typed("length", row[4], int)),
                        _ranges(row[5]),
                        _ranges(row[6]),
                    )
                )
            except (ValueError, TypeError) as exc:
                # What the interrupted operation was cannot be known, so neither
                # can what the region's memory holds: the region is lost too.
                name = str(row[1])
                if name in regions and not regions[name].gone:
                    why = f"an interrupted operation's record: {type(exc).__name__}: {exc}"
                    regions[name] = _malformed(name, why)
        return list(regions.values()), intents

    def put_region(self, record: RegionRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO regions (name, size, backing, page_size, block_size, path, "
            "labels, acl, created_at, plugged, gone, options) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            record.name,
            record.size,
            record.backing,
            record.page_size,
            record.block_size,
            record.path,
            json.dumps(record.labels),
            acl_to_json(record.acl),
            record.created_at,
            _dump(record.plugged),
            record.gone,
            options_to_json(record.options),
        )

    def put_options(self, name: str, options: RegionOptions) -> None:
        self._write("UPDATE regions SET options = ? WHERE name = ?", options_to_json(options), name)

    def delete_region(self, name: str) -> None:
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM regions WHERE name = ?", (name,))
            self._db.execute("DELETE FROM intents WHERE region = ?", (name,))
            self._db.execute("DELETE FROM holds WHERE region = ?", (name,))
            self._db.execute("COMMIT")

    def mark_gone(self, name: str, reason: str) -> None:
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE regions SET gone = ? WHERE name = ?", (reason, name))
            self._db.execute("DELETE FROM intents WHERE region = ?", (name,))
            self._db.execute("COMMIT")

    def begin(
        self,
        region: str,
        op: str,
        r: Range,
        keep: tuple[Range, ...] = (),
        ranges: tuple[Range, ...] = (),
    ) -> int:
        # One statement, so its own transaction (autocommit): no BEGIN and
        # COMMIT round trips, each of which let other threads take the GIL.
        with self._writing():
            cur = self._db.execute(
                "INSERT INTO intents (region, op, offset, length, keep, started, ranges) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (region, op, r.offset, r.length, _dump(keep), time.time(), _dump(ranges)),
            )
            return int(cur.lastrowid or 0)

    def finish(self, intent: int | None, region: str, plugged: tuple[Range, ...]) -> None:
        with self._writing():
            cur = self._db.execute(
                "UPDATE regions SET plugged = ?, finished_intent = ? WHERE name = ?",
                (_dump(plugged), intent, region),
            )
            if not cur.rowcount and intent is not None:  # no such region: no trigger either
                self._db.execute("DELETE FROM intents WHERE id = ?", (intent,))

    def load_hugetlb_added(self) -> dict[PoolKey, int]:
        with self._lock:
            rows = self._db.execute("SELECT page_size, node, pages FROM hugetlb_added").fetchall()
        added: dict[PoolKey, int] = {}
        for page_size, node, pages in rows:
            if isinstance(page_size, int) and isinstance(node, int) and isinstance(pages, int):
                added[(page_size, None if node == KERNEL_WIDE_NODE else node)] = pages
        return added

    def put_hugetlb_added(self, pool: PoolKey, pages: int) -> None:
        page_size, node = pool
        self._write(
            "INSERT OR REPLACE INTO hugetlb_added (page_size, node, pages) VALUES (?, ?, ?)",
            page_size,
            KERNEL_WIDE_NODE if node is None else node,
            pages,
        )

    def load_holds(self) -> list[HoldRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT region, holder, reason, expires_at FROM holds ORDER BY region, holder"
            ).fetchall()
        holds = []
        for row in rows:
            try:
                holds.append(
                    HoldRecord(
                        _typed("region", row[0], str),
                        _typed("holder", row[1], str),
                        _typed("reason", row[2], str),
                        _typed("expires_at", row[3], float),
                    )
                )
            except (ValueError, TypeError):
                # A hold that cannot be read is kept as one that never expires:
                # dropping it could let a hand-over's memory be unplugged.
                holds.append(HoldRecord(str(row[0]), str(row[1]), "unreadable hold", float("inf")))
        return holds

    def put_hold(self, hold: HoldRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO holds (region, holder, reason, expires_at) VALUES (?, ?, ?, ?)",
            hold.region,
            hold.holder,
            hold.reason,
            hold.expires_at,
        )

    def delete_hold(self, region: str, holder: str) -> None:
        self._write("DELETE FROM holds WHERE region = ? AND holder = ?", region, holder)

    def close(self) -> None:
        with self._lock:
            self._db.close()
