"""The state stores: every implementation runs the shared suite (intents, finish,
delete, mark_gone); the SQLite store on a real database file also reopens,
migrates, refuses what it cannot write, and loads malformed rows as lost."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from memplug.common.errors import FailedPrecondition
from memplug.common.ranges import Range
from memplug.common.sizes import MiB
from memplug.daemon.state import sqlite as store_mod
from memplug.daemon.state.records import Acl, HoldRecord, Placement, RegionOptions
from memplug.daemon.state.sqlite import SCHEMA_VERSION, SqliteStore
from memplug.daemon.state.store import MemoryStore, RegionRecord, StateStore


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


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    made: StateStore = (
        SqliteStore(tmp_path / "state.db") if request.param == "sqlite" else MemoryStore()
    )
    try:
        yield made
    finally:
        made.close()


def test_a_region_reads_back_as_written_and_is_replaced_by_name(store: StateStore) -> None:
    store.put_region(record())
    store.put_region(record("vm1"))
    store.put_region(record("vm1", plugged=(Range(0, 2 * MiB),)))
    regions, intents = store.load()
    assert sorted(regions, key=lambda r: r.name) == [
        record(),
        record("vm1", plugged=(Range(0, 2 * MiB),)),
    ]
    assert intents == []


def test_an_intent_keeps_every_range_of_a_list(store: StateStore) -> None:
    parts = (Range(0, 2 * MiB), Range(8 * MiB, 4 * MiB), Range(60 * MiB, 2 * MiB))
    store.put_region(record())
    multi = store.begin("vm0", "unplug", Range(0, 62 * MiB), (), parts)
    single = store.begin("vm0", "plug", Range(16 * MiB, 2 * MiB))
    _, intents = store.load()
    by_id = {i.id: i for i in intents}
    assert by_id[multi].ranges == by_id[multi].parts == parts
    assert by_id[multi].range == Range(0, 62 * MiB)
    assert by_id[single].ranges == () and by_id[single].parts == (Range(16 * MiB, 2 * MiB),)


def test_delete_region_drops_its_intents_only(store: StateStore) -> None:
    store.put_region(record())
    store.put_region(record("vm1"))
    store.begin("vm0", "plug", Range(0, 2 * MiB))
    kept = store.begin("vm1", "discard", Range(0, 2 * MiB))
    store.delete_region("vm0")
    regions, intents = store.load()
    assert [r.name for r in regions] == ["vm1"]
    assert [i.id for i in intents] == [kept]


def test_mark_gone_keeps_the_record_with_why_and_drops_its_intents(store: StateStore) -> None:
    store.put_region(record())
    store.begin("vm0", "unplug", Range(0, 2 * MiB))
    store.mark_gone("vm0", "no fd came back")
    regions, intents = store.load()
    assert [(r.name, r.gone) for r in regions] == [("vm0", "no fd came back")]
    assert intents == []


def test_finish_closes_only_its_own_intent(store: StateStore) -> None:
    store.put_region(record())
    first = store.begin("vm0", "plug", Range(0, 2 * MiB))
    second = store.begin("vm0", "unplug", Range(8 * MiB, 2 * MiB))
    store.finish(second, "vm0", ())
    assert [i.id for i in store.load()[1]] == [first]
    store.finish(None, "vm0", (Range(0, 2 * MiB),))  # bookkeeping only (warm pool adoption)
    regions, intents = store.load()
    assert [i.id for i in intents] == [first]
    assert regions[0].plugged == (Range(0, 2 * MiB),)


def test_finish_of_a_region_without_a_row_still_closes_the_intent(store: StateStore) -> None:
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


def test_a_store_from_a_newer_memplugd_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    SqliteStore(db).close()
    newer = sqlite3.connect(db, isolation_level=None)
    newer.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    newer.close()
    with pytest.raises(RuntimeError, match="schema 99, newer than this memplugd"):
        SqliteStore(db)


# --------------------------------------------------------------------------- SQLite only


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
            thp=True,
            placement=Placement("bind", (0,)),
            lock=True,
            from_warm_pool=True,
            charge_cgroup="/kubepods/pod1/ctr",
        ),
    )
    store = SqliteStore(db)
    store.put_region(full)
    store.close()
    with closing(sqlite3.connect(db)) as raw:
        acl, options = raw.execute("SELECT acl, options FROM regions").fetchone()
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
        "charge_cgroup": "/kubepods/pod1/ctr",
        "charge_to_peer": False,
        "charge_hugetlb_cgroup": "",
    }
    assert SqliteStore(db).load()[0] == [full]


def test_the_cgroups_of_a_first_attacher_are_recorded_and_survive_reopening(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    waiting = dataclasses.replace(record(), options=RegionOptions(charge_to_peer=True))
    store = SqliteStore(db)
    store.put_region(waiting)
    intent = store.begin("vm0", "unplug", Range(0, 2 * MiB))
    assert store.load()[0][0].options.awaiting_peer
    bound = RegionOptions(
        charge_to_peer=True, charge_cgroup="/pod1/vmm", charge_hugetlb_cgroup="/pod1"
    )
    store.put_options("vm0", bound)
    store.close()
    (loaded,), intents = SqliteStore(db).load()
    assert loaded == dataclasses.replace(waiting, options=bound)
    assert not loaded.options.awaiting_peer
    assert [i.id for i in intents] == [intent]  # the plugged set and intents are untouched


def test_options_written_before_charge_cgroup_existed_load_with_the_daemons_cgroup(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    store.put_region(record("old"))
    store.close()
    older = '{"thp": false, "numa_policy": "default", "numa_nodes": [], "lock": false}'
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("UPDATE regions SET options = ? WHERE name = 'old'", (older,))
    (loaded,) = SqliteStore(db).load()[0]
    assert not loaded.gone
    assert loaded.options == RegionOptions()
    assert loaded.options.charge_cgroup == ""


def test_a_write_the_database_refuses_raises_and_changes_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.put_region(record())
    intent = store.begin("vm0", "plug", Range(0, 2 * MiB))
    before = store.load()
    store._db.execute("PRAGMA query_only = 1")  # every write now fails as on a read-only fs
    writes: list[Callable[[], object]] = [
        lambda: store.put_region(record("vm1")),
        lambda: store.delete_region("vm0"),
        lambda: store.mark_gone("vm0", "why"),
        lambda: store.begin("vm0", "unplug", Range(0, 2 * MiB)),
        lambda: store.finish(intent, "vm0", (Range(0, 2 * MiB),)),
    ]
    for write in writes:
        with pytest.raises(FailedPrecondition, match=f"the state in {tmp_path} cannot be written"):
            write()
        assert not store._db.in_transaction
    assert store.load() == before
    store._db.execute("PRAGMA query_only = 0")
    store.finish(intent, "vm0", (Range(0, 2 * MiB),))  # the retry works
    assert store.load()[1] == []
    store.close()


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("labels", '{"app": "te', "JSONDecodeError"),
        ("acl", "[1, 2]", "acl: expected a JSON object"),
        ("plugged", "[[0]]", "ValueError"),
        ("plugged", '[[0, "2M"]]', "is not two non-negative integers"),
        ("size", "big", "size: expected int"),
        ("created_at", "yesterday", "ValueError"),
        ("options", '{"charge_cgroup": 7}', "charge_cgroup: expected a string"),
    ],
)
def test_a_malformed_row_loads_as_a_lost_region_and_the_others_as_written(
    tmp_path: Path, column: str, value: str, why: str
) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    store.put_region(record("bad"))
    store.put_region(record("good"))
    store.close()
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(f"UPDATE regions SET {column} = ? WHERE name = 'bad'", (value,))
    regions = {r.name: r for r in SqliteStore(db).load()[0]}
    assert regions["good"] == record("good")
    assert "malformed" in regions["bad"].gone and why in regions["bad"].gone


def test_a_malformed_intent_makes_its_region_lost(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    store.put_region(record("bad"))
    store.put_region(record("good"))
    good = store.begin("good", "plug", Range(0, 2 * MiB))
    store.close()
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO intents (region, op, offset, length, keep, started) "
            "VALUES ('bad', 'plug', 0, 2097152, '[[0, ', 1.0)"
        )
    regions, intents = SqliteStore(db).load()
    by_name = {r.name: r for r in regions}
    assert by_name["good"] == record("good")
    assert "an interrupted operation's record" in by_name["bad"].gone
    assert [i.id for i in intents] == [good]


def test_the_pages_added_to_hugetlb_pools_survive_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    store = SqliteStore(db)
    store.put_hugetlb_added((2 * MiB, None), 64)
    store.put_hugetlb_added((2 * MiB, 0), 3)
    store.put_hugetlb_added((2 * MiB, None), 60)
    store.close()
    assert SqliteStore(db).load_hugetlb_added() == {(2 * MiB, None): 60, (2 * MiB, 0): 3}
    memory_store = MemoryStore()
    memory_store.put_hugetlb_added((1 << 30, 1), 2)
    assert memory_store.load_hugetlb_added() == {(1 << 30, 1): 2}


def test_a_version_2_store_is_migrated_with_no_pages_added(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    store_mod._v1(old)
    store_mod._v2(old)
    old.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    old.close()
    store = SqliteStore(db)
    assert store.load_hugetlb_added() == {}
    store.put_hugetlb_added((2 * MiB, None), 8)
    assert store.load_hugetlb_added() == {(2 * MiB, None): 8}


def test_a_version_3_store_is_migrated_with_no_holds(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    store_mod._v1(old)
    store_mod._v2(old)
    store_mod._v3(old)
    old.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    old.close()
    store = SqliteStore(db)
    assert store.load_holds() == []
    hold = HoldRecord("vm0", "vm-update", "hand-over", 1e10)
    store.put_hold(hold)
    assert store.load_holds() == [hold]
    check = sqlite3.connect(db)
    version = check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    check.close()
    assert version == (str(SCHEMA_VERSION),)


def test_a_version_4_store_is_migrated_with_its_open_intents_as_single_ranges(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for step in (store_mod._v1, store_mod._v2, store_mod._v3, store_mod._v4):
        step(old)
    old.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    old.execute(
        "INSERT INTO intents (region, op, offset, length, keep, started) "
        "VALUES ('vm0', 'unplug', ?, ?, '[]', 1.0)",
        (4 * MiB, 2 * MiB),
    )
    old.close()
    store = SqliteStore(db)
    _, intents = store.load()
    assert [(i.op, i.range, i.ranges, i.parts) for i in intents] == [
        ("unplug", Range(4 * MiB, 2 * MiB), (), (Range(4 * MiB, 2 * MiB),))
    ]
    parts = (Range(0, 2 * MiB), Range(8 * MiB, 2 * MiB))
    store.begin("vm0", "plug", Range(0, 10 * MiB), (), parts)
    assert store.load()[1][-1].ranges == parts
    check = sqlite3.connect(db)
    version = check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    check.close()
    assert version == ("5",) == (str(SCHEMA_VERSION),)
