"""Regions charged to a consumer's memory cgroup, on real cgroups and a real memplugd.

Each test builds, under this test process's own memory cgroup, a parent with
two children: `home`, where the daemon is moved, and `consumer`, the cgroup a
region is charged to. They are siblings, so a charge to one never shows in
the other's usage, and all of it is removed afterwards.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import (
    HUGE_2M,
    DaemonProcess,
    MiB,
    create,
    error_class,
    get,
    huge_free,
    require,
    require_root,
    start_daemon,
)
from hardening_kit import (
    MemoryCgroup,
    cgroup_path,
    memory_cgroup,
    own_memory_cgroup_dir,
    record,
)
from test_state_and_metrics import free_port, scrape

from memplug.client import Client
from memplug.common import memory
from memplug.daemon.kernel import cgroup
from memplug.v1 import memplug_pb2 as pb

Factory = Callable[..., DaemonProcess]
MEMPLUG = Path(sys.executable).parent / "memplug"
SIZE = 256 * MiB
# What the daemon's own cgroup may gain while it serves a plug of SIZE charged
# elsewhere (its heap, gRPC buffers): far below the plug itself.
DAEMON_SLACK = SIZE // 20


@contextlib.contextmanager
def home_and_consumer(
    consumer_limit: int | None = None,
) -> Iterator[tuple[MemoryCgroup, MemoryCgroup, str]]:
    """(home, consumer, consumer's path as /proc/PID/cgroup prints it): sibling cgroups."""
    own = own_memory_cgroup_dir()
    with (
        memory_cgroup(None, parent=own) as top,
        memory_cgroup(None, parent=top.path) as home,
        memory_cgroup(consumer_limit, parent=top.path) as consumer,
    ):
        yield home, consumer, cgroup_path(consumer)


@contextlib.contextmanager
def daemon_and_consumer(
    factory: Factory, consumer_limit: int | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[DaemonProcess, MemoryCgroup, MemoryCgroup, str]]:
    """(daemon moved into `home`, home, consumer, consumer's path as /proc/PID/cgroup prints it)."""
    with home_and_consumer(consumer_limit) as (home, consumer, path):
        d = factory(env=env)
        try:
            home.add(d.proc.pid)
            yield d, home, consumer, path
        finally:
            assert d.alive(), f"memplugd died:\n{d.log()}"
            code = d.stop()
            assert code == 0, f"memplugd exited with {code}:\n{d.log()}"
            assert "Traceback" not in d.log(), d.log()


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_plugged_memory_is_charged_to_the_named_cgroup_not_the_daemons(
    daemon_factory: Factory,
) -> None:
    port = free_port()
    with daemon_and_consumer(lambda env: daemon_factory("--metrics", str(port), env=env)) as (
        d,
        home,
        consumer,
        path,
    ):
        region = create(d, "vm", SIZE, charge_cgroup=path)
        assert region.charge_cgroup == path
        assert get(d, "vm").charge_cgroup == path
        consumer_before, home_before = consumer.usage(), home.usage()

        d.plug("vm", 0, 0)
        charged = consumer.usage() - consumer_before
        daemon_grew = home.usage() - home_before
        print(f"plug of {SIZE}: consumer +{charged}, daemon +{daemon_grew}")
        record("charge_consumer_bytes", charged, after="plug of 256 MiB")
        record("charge_daemon_bytes", daemon_grew, after="plug of 256 MiB")
        assert abs(charged - SIZE) <= SIZE * 0.02, f"consumer cgroup +{charged}, plugged {SIZE}"
        assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"

        # Discard punches and backs every block again: still the consumer's.
        d.stub.Discard(pb.RangeRequest(name="vm"))
        d.populate("vm", 0, 0, write=True)
        charged = consumer.usage() - consumer_before
        daemon_grew = home.usage() - home_before
        print(f"after discard and populate: consumer +{charged}, daemon +{daemon_grew}")
        record("charge_consumer_bytes", charged, after="discard and populate")
        record("charge_daemon_bytes", daemon_grew, after="discard and populate")
        assert abs(charged - SIZE) <= SIZE * 0.02, f"consumer cgroup +{charged} after discard"
        assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"

        text = scrape(port)
        assert f'memplug_region_charge_cgroup{{cgroup="{path}",region="vm"}} 1.0' in text, text
        show = memplug_cli(d, "show", "vm")
        assert f"memory cgroup {path}" in show, show
        made = memplug_cli(d, "create", "cli", "64M", "--charge-cgroup", path, "--json")
        assert f'"charge_cgroup": "{path}"' in made, made


def test_a_plug_beyond_the_cgroups_limit_is_refused_and_leaves_nothing(
    daemon_factory: Factory,
) -> None:
    limit = 64 * MiB
    with daemon_and_consumer(daemon_factory, consumer_limit=limit) as (d, _, consumer, path):
        create(d, "other", 64 * MiB)
        d.plug("other", 0, 0)
        create(d, "vm", SIZE, charge_cgroup=path)

        err = rpc_error(lambda: d.plug("vm", 0, 0))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        message = err.details() or ""
        assert path in message and "missing" in message, message
        assert "bytes) missing" in message and "raise that cgroup's limit" in message, message
        region = get(d, "vm")
        assert region.plugged_bytes == 0 and region.allocated_bytes == 0, region
        record("charge_refused_left_bytes", consumer.usage(), limit="64 MiB")
        assert consumer.usage() < 4 * MiB, f"the refused plug left {consumer.usage()} charged"
        assert get(d, "other").plugged_bytes == 64 * MiB
        d.plug("vm", 0, 32 * MiB)  # what fits is still served, and charged there
        assert get(d, "vm").plugged_bytes == 32 * MiB


def test_the_helper_not_the_daemon_dies_when_the_limit_is_hit_unchecked(
    daemon_factory: Factory,
) -> None:
    env = {"MEMPLUG_MEMCG_CHECK": "0"}
    with daemon_and_consumer(daemon_factory, 64 * MiB, env=env) as (d, _, consumer, path):
        create(d, "vm", SIZE, charge_cgroup=path)
        kills = consumer.oom_kills()
        err = rpc_error(lambda: d.plug("vm", 0, 0))
        record("charge_oom_kills", consumer.oom_kills() - kills, check="off")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert consumer.oom_kills() > kills, "the limit was never reached (no OOM kill)"
        assert d.alive()
        region = get(d, "vm")
        assert region.plugged_bytes == 0 and region.allocated_bytes == 0, region


def test_a_removed_or_bad_charge_cgroup_is_a_clear_error(daemon_factory: Factory) -> None:
    with daemon_and_consumer(daemon_factory) as (d, _, consumer, path):
        create(d, "vm", SIZE, charge_cgroup=path)
        consumer.path.rmdir()  # the consumer's pod ended
        err = rpc_error(lambda: d.plug("vm", 0, 0))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert path in (err.details() or "") and "does not exist" in (err.details() or "")
        assert error_class(err) == "FailedPrecondition"
        assert get(d, "vm").allocated_bytes == 0

        err = rpc_error(lambda: create(d, "gone", SIZE, charge_cgroup=path))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert path in (err.details() or "")
        for bad in (path + "/../..", "relative/path", "/a/./b"):

            def create_bad(bad: str = bad) -> pb.Region:
                return create(d, "bad", SIZE, charge_cgroup=bad)

            err = rpc_error(create_bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.details())
        assert [r.name for r in d.stub.ListRegions(pb.ListRegionsRequest()).regions] == ["vm"]


# --------------------------------------------------------------------------- charge_to_peer

# A consumer: joins the cgroups whose cgroup.procs files it is given (before it
# connects, as a container's process is in its cgroups from the start), then
# attaches each region, by OPEN or by a ticket redeemed on the fd socket, says
# so, and holds the fds until its stdin closes.
CONSUMER = """
import os, sys
from memplug.client import Client
from memplug.client.attach import redeem
socket, procs, wanted = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
for path in procs:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
held = []
with Client(socket) as c:
    for item in wanted:
        how, name = item.split(":")
        try:
            if how == "open":
                held.append(c.attach(name, sparse=True, map_memory=False))
            else:
                ticket = c.ticket(name, "rw")
                held.append(redeem(ticket.fd_socket, ticket.ticket)[0])
        except Exception as exc:
            print("refused", name, type(exc).__name__, exc, flush=True)
            continue
        print("attached", name, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def consumer_process(d: DaemonProcess, cgroups: list[Path], *attaches: str) -> Iterator[list[str]]:
    """A consumer process in `cgroups` (their directories) that attached `attaches`
    ("open:NAME" or "ticket:NAME"); yields its answer per attach, ends it after."""
    procs = ",".join(str(c / "cgroup.procs") for c in cgroups)
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, str(d.socket), procs, *attaches],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        answers = [proc.stdout.readline().strip() for _ in attaches]
        assert all(answers), f"the consumer died: {answers}"
        yield answers
    finally:
        proc.stdin.close()
        proc.wait(30)
        proc.stdout.close()


def memplug_cli(d: DaemonProcess, *args: str) -> str:
    env = {"MEMPLUG_SOCKET": str(d.socket), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(MEMPLUG), *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_a_region_charged_to_its_peer_bills_the_first_attachers_cgroup_not_the_daemons(
    daemon_factory: Factory,
) -> None:
    port = free_port()
    with daemon_and_consumer(lambda env: daemon_factory("--metrics", str(port), env=env)) as (
        d,
        home,
        consumer,
        path,
    ):
        region = create(d, "vm", SIZE, charge_to_peer=True)
        assert region.charge_to_peer and region.charge_cgroup == "", region
        assert "first attacher's cgroup (not attached yet" in memplug_cli(d, "show", "vm")

        # Nobody to bill yet: allocating is refused, not charged to the daemon.
        err = rpc_error(lambda: d.plug("vm", 0, 0))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        message = err.details() or ""
        assert "none has attached it yet" in message and "attach it first" in message, message
        assert error_class(err) == "FailedPrecondition"
        d.stub.Unplug(pb.RangeRequest(name="vm"))  # nothing to allocate: allowed
        assert get(d, "vm").allocated_bytes == 0
        waiting = 'memplug_region_awaiting_first_attacher{region="vm"} 1.0'
        assert waiting in scrape(port)

        err = rpc_error(lambda: create(d, "both", SIZE, charge_cgroup=path, charge_to_peer=True))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "exclude each other" in (err.details() or "")

        with consumer_process(d, [consumer.path], "open:vm") as answers:
            assert answers == ["attached vm"], answers
            region = get(d, "vm")
            assert region.charge_cgroup == path and region.charge_to_peer, region
            assert "is charged to its first attacher" in d.log(), d.log()

            # A later attacher elsewhere (this test, in its own cgroup) changes nothing.
            with Client(d.socket) as c, c.attach("vm", sparse=True, map_memory=False):
                pass
            assert get(d, "vm").charge_cgroup == path

            consumer_before, home_before = consumer.usage(), home.usage()
            d.plug("vm", 0, 0)
            charged = consumer.usage() - consumer_before
            daemon_grew = home.usage() - home_before
            print(f"peer-charged plug of {SIZE}: consumer +{charged}, daemon +{daemon_grew}")
            record("charge_peer_consumer_bytes", charged, after="plug of 256 MiB")
            record("charge_peer_daemon_bytes", daemon_grew, after="plug of 256 MiB")
            assert abs(charged - SIZE) <= SIZE * 0.02, f"consumer cgroup +{charged}, plugged {SIZE}"
            assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"

        text = scrape(port)
        assert f'memplug_region_charge_cgroup{{cgroup="{path}",region="vm"}} 1.0' in text, text
        assert waiting not in text, text
        show = memplug_cli(d, "show", "vm")
        assert f"memory cgroup {path} (its first attacher's)" in show, show
        made = memplug_cli(d, "create", "cli", "64M", "--charge-to-peer", "--json")
        assert '"charge_to_peer": true' in made and '"charge_cgroup": ""' in made, made


# Connects to the fd socket, forks, and exits: the connection's peer (the
# process SO_PEERCRED and SO_PEERPIDFD name) is gone when the child, told to
# on stdin once the test has reaped its parent, asks for the region on it.
ORPHANED_CONNECTION = """
import os, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
if os.fork() == 0:
    sys.stdin.readline()
    conn.sendall(b"MEMPLUG/1 OPEN " + sys.argv[2].encode() + b" rw\\n")
    print(conn.recv(4096).decode(errors="replace").splitlines()[0], flush=True)
os._exit(0)
"""


def test_an_attacher_that_is_not_the_connected_process_any_more_is_refused(
    daemon_factory: Factory,
) -> None:
    """Whoever holds the connection now, its peer exited (its pid free for reuse):
    its cgroups cannot be known, so the attach is refused and the region waits."""
    with daemon_and_consumer(daemon_factory) as (d, _, consumer, path):
        create(d, "vm", SIZE, charge_to_peer=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", ORPHANED_CONNECTION, str(d.fd_socket), "vm"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.wait(30) == 0  # reaped: the connecting process is gone for good
        proc.stdin.write("go\n")
        proc.stdin.close()
        answer = proc.stdout.readline().strip()
        proc.stdout.close()
        assert answer.startswith("ERR FAILED_PRECONDITION"), answer
        assert "charge_to_peer" in answer and "exited" in answer, answer
        assert get(d, "vm").charge_cgroup == ""

        with consumer_process(d, [consumer.path], "open:vm") as answers:
            assert answers == ["attached vm"], answers
        assert get(d, "vm").charge_cgroup == path


def test_the_first_attacher_by_ticket_is_charged_and_its_cgroup_survives_a_restart(
    daemon_factory: Factory, small_tmpfs: Callable[[str], Path]
) -> None:
    files = small_tmpfs("512M")  # a FILE region on tmpfs: its pages are memory, and
    size = 64 * MiB  # a restarted daemon reopens its file (memfds need systemd for that)
    with home_and_consumer() as (home, consumer, path):
        d = daemon_factory("--allow-dir", str(files))
        home.add(d.proc.pid)
        create(d, "disk", size, pb.BACKING_FILE, path="disk.img", charge_to_peer=True)
        with consumer_process(d, [consumer.path], "ticket:disk") as answers:
            assert answers == ["attached disk"], answers
        assert get(d, "disk").charge_cgroup == path
        assert d.stop() == 0

        again = start_daemon(d.socket.parent, *d.args[d.args.index("--log-level") + 2 :])
        try:
            home.add(again.proc.pid)
            region = get(again, "disk")
            assert region.charge_cgroup == path and region.charge_to_peer, region
            consumer_before, home_before = consumer.usage(), home.usage()
            again.plug("disk", 0, 0)
            charged = consumer.usage() - consumer_before
            daemon_grew = home.usage() - home_before
            print(f"after a restart, plug of {size}: consumer +{charged}, daemon +{daemon_grew}")
            assert abs(charged - size) <= size * 0.02, f"consumer cgroup +{charged}"
            assert daemon_grew < DAEMON_SLACK, f"the daemon's cgroup grew by {daemon_grew}"
            again.stub.DeleteRegion(pb.DeleteRegionRequest(name="disk"))
        finally:
            assert again.alive(), again.log()
            assert again.stop() == 0, again.log()


# --------------------------------------------------------------------------- hugetlb controller


@dataclass
class HugetlbCgroup:
    path: Path  # its directory
    name: str  # as /proc/PID/cgroup prints it
    version: int

    def _file(self, v2: str, v1: str) -> Path:
        return self.path / (f"hugetlb.2MB.{v2}" if self.version == 2 else f"hugetlb.2MB.{v1}")

    def limit(self, value: int) -> None:
        self._file("max", "limit_in_bytes").write_text(str(value))

    def usage(self) -> int:
        return int(self._file("current", "usage_in_bytes").read_text())


@contextlib.contextmanager
def hugetlb_cgroup(limit: int) -> Iterator[HugetlbCgroup]:
    """A fresh hugetlb cgroup under the controller's root, limited to `limit` bytes of
    2 MiB pages; on cgroup v2 the root's subtree_control gets +hugetlb for it (and
    loses it again after, if it did not have it)."""
    require_root("creates a hugetlb cgroup")
    ctrl = cgroup.controller("hugetlb")
    require(ctrl is not None, "no hugetlb cgroup controller is mounted (v1 or v2)")
    assert ctrl is not None
    enabled_here = False
    if ctrl.version == 2:
        control = ctrl.mount / "cgroup.subtree_control"
        if "hugetlb" not in control.read_text().split():
            control.write_text("+hugetlb")
            enabled_here = True
    where = ctrl.mount / f"memplug-test-{secrets.token_hex(4)}"
    where.mkdir()
    try:
        cg = HugetlbCgroup(where, "/" + where.name, ctrl.version)
        cg.limit(limit)
        yield cg
    finally:
        for _ in range(100):
            try:
                where.rmdir()
                break
            except OSError:
                time.sleep(0.05)  # a process of the test still leaving it
        if enabled_here:
            with contextlib.suppress(OSError):  # another cgroup of someone else's uses it
                control.write_text("-hugetlb")


@contextlib.contextmanager
def spare_huge_pages(pages: int) -> Iterator[None]:
    """At least `pages` free 2 MiB pages: the pool grown by what it lacks, and shrunk
    by as much after. It never shrinks the pool under pages others use meanwhile."""
    require_root("sizes the hugetlb pool")
    path = memory.HUGEPAGES_SYSFS / f"hugepages-{HUGE_2M // 1024}kB" / "nr_hugepages"
    require(path.exists(), "the kernel offers no 2 MiB huge page pool")
    pool = memory.huge_pool(HUGE_2M)
    added = max(0, pages - (pool.free - pool.reserved))
    if added:
        path.write_text(str(pool.total + added))
    try:
        pool = memory.huge_pool(HUGE_2M)
        require(pool.free - pool.reserved >= pages, f"could not get {pages} free huge pages")
        yield
    finally:
        if added:
            path.write_text(str(max(0, memory.huge_pool(HUGE_2M).total - added)))


def check_hugetlb_limit(d: DaemonProcess, huge: HugetlbCgroup, limit: int) -> None:
    """Region "huge" (twice the limit) charged to `huge`: a whole plug is refused
    and leaves nothing; a plug up to the limit is served and charged there."""
    free, before = huge_free(), huge.usage()
    err = rpc_error(lambda: d.plug("huge", 0, 0))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    message = err.details() or ""
    assert f"hugetlb charge cgroup {huge.name} " in message, message
    assert f"{limit // MiB} MiB ({limit} bytes) missing" in message, message
    # Exact witnesses: the pages a plug takes go into the region's memfd (its
    # st_blocks) and are charged to its cgroup; the pool's free count is the
    # machine's, which other users may move meanwhile (see pool_back).
    assert get(d, "huge").allocated_bytes == 0
    assert huge.usage() == before
    pool_back(free, "the refused plug")
    assert d.alive()

    d.plug("huge", 0, limit)  # what fits under the limit is served, and charged there
    grew = huge.usage() - before
    record("charge_hugetlb_cgroup_bytes", grew, after=f"plug of {limit // MiB} MiB")
    assert grew == limit, f"hugetlb cgroup +{grew}, plugged {limit}"
    assert get(d, "huge").allocated_bytes == limit
    d.stub.Unplug(pb.RangeRequest(name="huge"))
    assert huge.usage() == before
    pool_back(free, "the unplug")


def pool_back(free: int, after: str) -> None:
    """The 2 MiB pool's free count is `free` again (within 3 s). A difference that
    persists is recorded, not failed: the pool is shared with every other user of
    the machine, and the caller has checked the region's own pages exactly."""
    deadline = time.monotonic() + 3
    while huge_free() != free and time.monotonic() < deadline:
        time.sleep(0.1)
    now = huge_free()
    record("charge_hugetlb_pool_drift_pages", now - free, after=after)
    if now != free:
        print(f"after {after}: the 2 MiB pool has {now} free pages, {free} before (others?)")


def test_a_hugetlb_region_is_charged_to_its_first_attachers_hugetlb_cgroup(
    daemon_factory: Factory,
) -> None:
    """The first attacher sits in a memory cgroup (v1 here) and a hugetlb cgroup (v2
    here) of different paths: its hugetlb pages are charged to the hugetlb one."""
    limit = 16 * MiB
    with (
        spare_huge_pages(2 * limit // HUGE_2M),
        daemon_and_consumer(daemon_factory) as (d, _, consumer, path),
        hugetlb_cgroup(limit) as huge,
    ):
        create(d, "huge", 2 * limit, pb.BACKING_HUGETLB, page_size=HUGE_2M, charge_to_peer=True)
        with consumer_process(d, [consumer.path, huge.path], "open:huge") as answers:
            assert answers == ["attached huge"], answers
            region = get(d, "huge")
            assert region.charge_cgroup == path
            # Where the two paths differ, the API names the hugetlb one too.
            assert region.charge_hugetlb_cgroup == ("" if huge.name == path else huge.name)
            show = memplug_cli(d, "show", "huge")
            if huge.name != path:
                assert f"hugetlb cgroup {huge.name}" in show, show
            check_hugetlb_limit(d, huge, limit)


def test_a_hugetlb_region_is_charged_to_the_hugetlb_cgroup_of_its_charge_cgroups_path(
    daemon_factory: Factory,
) -> None:
    """charge_cgroup names one path; the hugetlb cgroup of that path is charged (and
    limits the plug) where the hugetlb controller has it, on another mount or not."""
    limit = 16 * MiB
    with spare_huge_pages(2 * limit // HUGE_2M), hugetlb_cgroup(limit) as huge:
        memory_ctrl = cgroup.controller("memory")
        assert memory_ctrl is not None
        twin = memory_ctrl.mount / huge.name.lstrip(
            "/"
        )  # the same path under the memory controller
        if not twin.exists():
            twin.mkdir()
        try:
            d = daemon_factory()
            create(d, "huge", 2 * limit, pb.BACKING_HUGETLB, page_size=HUGE_2M,
                   charge_cgroup=huge.name)  # fmt: skip
            check_hugetlb_limit(d, huge, limit)
            d.stub.DeleteRegion(pb.DeleteRegionRequest(name="huge"))
        finally:
            if twin != huge.path:
                with contextlib.suppress(OSError):
                    twin.rmdir()


def test_a_list_of_ranges_is_charged_to_the_cgroup_and_refused_whole_at_its_limit(
    daemon_factory: Factory,
) -> None:
    """A multi-range plug bills the named cgroup; past its limit, no range of the list stays."""
    block = 2 * MiB
    spread = [pb.Range(offset=i * 4 * block, length=block) for i in range(16)]  # 32 MiB
    with daemon_and_consumer(daemon_factory, consumer_limit=48 * MiB) as (d, home, consumer, path):
        create(d, "vm", SIZE, charge_cgroup=path)
        consumer_before, home_before = consumer.usage(), home.usage()
        for _ in d.stub.Plug(pb.PlugRequest(name="vm", ranges=spread)):
            pass
        charged = consumer.usage() - consumer_before
        assert get(d, "vm").plugged_bytes == 16 * block
        assert abs(charged - 16 * block) <= 16 * block * 0.02, f"consumer +{charged}"
        assert home.usage() - home_before < DAEMON_SLACK

        # 32 MiB more would pass the 48 MiB limit: the whole list is refused.
        more = [pb.Range(offset=r.offset + block, length=block) for r in spread]
        err = rpc_error(lambda: list(d.stub.Plug(pb.PlugRequest(name="vm", ranges=more))))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert path in (err.details() or ""), err.details()
        assert get(d, "vm").plugged_bytes == 16 * block, "a refused list left ranges plugged"
        assert consumer.usage() - consumer_before <= 16 * block * 1.02
