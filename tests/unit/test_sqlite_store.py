"""The SQLite state store on a real database file: intents, finish, reopen, migrations."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from memplug.common.ranges import Range
from memplug.common.sizes import MiB
from memplug.daemon.state import sqlite as store_mod
from memplug.daemon.state.records import Acl, Placement, RegionOptions, RegionRecord
from memplug.daemon.state.sqlite import SCHEMA_VERSION, SqliteStore


def record(name: str = "vm0", plugged: tuple[Range, ...] = ()) -> RegionRecord:
    return RegionRecord(
        name=name,
        size=64 * MiB,
        backing="shmem",
        page_size=4096,
        block_size=2 * MiB,
        path="",
        labels={"app": "test"},
        acl=Acl(owner_uid=0),
        created_at=1.5,
        plugged=plugged,
        options=RegionOptions(thp=False),
    )


def test_intent_survives_a_reopen_until_finish_closes_it(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    store.put_region(record())
    intent = store.begin("vm0", "plug", Range(0, 4 * MiB), (Range(MiB, 4096),))
    store.close()

    store = SqliteStore(db)  # the daemon died in the middle of the plug
    regions, intents = store.load()
    assert [r.name for r in regions] == ["vm0"] and regions[0] == record()
    assert [(i.id, i.op, i.range, i.keep) for i in intents] == [
        (intent, "plug", Range(0, 4 * MiB), (Range(MiB, 4096),))
    ]

    store.finish(intent, "vm0", (Range(0, 4 * MiB),))
    store.close()
    regions, intents = SqliteStore(db).load()
    assert intents == []
    assert regions[0].plugged == (Range(0, 4 * MiB),)


def test_finish_closes_only_its_own_intent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.put_region(record())
    first = store.begin("vm0", "plug", Range(0, 2 * MiB))
    second = store.begin("vm0", "unplug", Range(8 * MiB, 2 * MiB))
    store.finish(second, "vm0", ())
    assert [i.id for i in store.load()[1]] == [first]
    store.finish(None, "vm0", (Range(0, 2 * MiB),))  # bookkeeping only (warm pool adoption)
    regions, intents = store.load()
    assert [i.id for i in intents] == [first]
    assert regions[0].plugged == (Range(0, 2 * MiB),)


def test_finish_of_a_region_without_a_row_still_closes_the_intent(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    intent = store.begin("ghost", "plug", Range(0, 2 * MiB))
    store.finish(intent, "ghost", ())
    assert store.load() == ([], [])


def test_a_version_1_store_is_migrated_with_its_regions_and_intents(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    store_mod._v1(old)
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    old.execute(
        "INSERT INTO regions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("vm0", 64 * MiB, "shmem", 4096, 2 * MiB, "", '{"app": "test"}',
         '{"owner_uid": [0]}', 1.5, json.dumps([[0, 2 * MiB]]), "", '{"thp": false}'),
    )  # fmt: skip
    old.execute(
        "INSERT INTO intents (region, op, offset, length, keep, started) "
        "VALUES ('vm0', 'unplug', 0, 2097152, '[]', 1.0)"
    )
    old.close()

    store = SqliteStore(db)
    regions, intents = store.load()
    assert regions == [record(plugged=(Range(0, 2 * MiB),))]
    assert [(i.op, i.range) for i in intents] == [("unplug", Range(0, 2 * MiB))]
    store.finish(intents[0].id, "vm0", ())  # the v2 trigger closes it
    assert store.load()[1] == []
    store.close()
    check = sqlite3.connect(db)
    version = check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    check.close()
    assert version == (str(SCHEMA_VERSION),)


def test_acl_and_options_are_stored_in_the_json_layout_every_memplugd_reads(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    full = dataclasses.replace(
        record(),
        acl=Acl(
            owner_uid=1000,
            allowed_uids=frozenset({1002, 1001}),
            allowed_gids=frozenset({100}),
            read_only_uids=frozenset({2000}),
            read_only_gids=frozenset({300, 200}),
        ),
        options=RegionOptions(
            thp=True, placement=Placement("bind", (0,)), lock=True, from_warm_pool=True
        ),
    )
    store = SqliteStore(db)
    store.put_region(full)
    store.close()
    raw = sqlite3.connect(db)
    acl, options = raw.execute("SELECT acl, options FROM regions").fetchone()
    raw.close()
    assert json.loads(acl) == {
        "owner_uid": [1000],
        "allowed_uids": [1001, 1002],
        "allowed_gids": [100],
        "read_only_uids": [2000],
        "read_only_gids": [200, 300],
    }
    assert json.loads(options) == {
        "thp": True,
        "numa_policy": "bind",
        "numa_nodes": [0],
        "lock": True,
        "from_warm_pool": True,
    }
    assert SqliteStore(db).load()[0] == [full]


def test_a_store_from_a_newer_memplugd_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    SqliteStore(db).close()
    newer = sqlite3.connect(db, isolation_level=None)
    newer.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    newer.close()
    with pytest.raises(RuntimeError, match="schema 99, newer than this memplugd"):
        SqliteStore(db)
