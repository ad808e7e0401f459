"""memplug.client.Client against a real memplugd: every call, its errors, attach, cancel.

Also PrivateMemory, which populates this process's own anonymous memory.
"""

from __future__ import annotations

import itertools
import mmap
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HUGE_2M, DaemonProcess, GiB, MiB, huge_free, start_daemon, stop_shared

from memplug.client import (
    AlreadyExists,
    Cancelled,
    Client,
    InvalidArgument,
    MemplugError,
    NotFound,
    PoolExhausted,
    PrivateMemory,
    Region,
    ResourceExhausted,
    Unavailable,
)
from memplug.client.local import mapping_address

Pool = Callable[[int], None]

_names = itertools.count()


def fresh() -> str:
    """A region name no other test of this module uses (they share one daemon)."""
    return f"c{next(_names)}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("memplugd"))
    yield d
    stop_shared(d)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(socket=daemon.socket, timeout=20) as c:
        yield c


def wait_until(
    what: str, check: Callable[[], Region], ok: Callable[[Region], bool], timeout: float = 5.0
) -> Region:
    deadline = time.monotonic() + timeout
    while True:
        region = check()
        if ok(region):
            return region
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s: {region}"
        time.sleep(0.05)


def hugetlb_mapped(address: int) -> int:
    """Bytes of huge pages mapped in this process's mapping that starts at address."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            total = 0
            for entry in lines[i + 1 :]:
                key, _, rest = entry.partition(":")
                if " " in key:  # the next mapping's header
                    break
                if key in ("Shared_Hugetlb", "Private_Hugetlb"):
                    total += int(rest.split()[0]) * 1024
            return total
    raise LookupError(f"no mapping at {address:#x}")


# --------------------------------------------------------------------------- regions


def test_create_get_list_delete_status(daemon: DaemonProcess, client: Client) -> None:
    a, b = fresh(), fresh()
    before = client.status()
    made = client.create_region(a, 64 * MiB, labels={"suite": "client", "role": "vm"})
    assert (made.name, made.size, made.backing) == (a, 64 * MiB, "shmem")
    assert made.page_size == mmap.PAGESIZE and made.block_size == 2 * MiB
    assert made.plugged == [] and made.plugged_bytes == 0 and made.allocated_bytes == 0
    assert made.labels == {"suite": "client", "role": "vm"}
    assert made.created_at == pytest.approx(time.time(), abs=60)
    client.create_region(b, 32 * MiB, labels={"suite": "client", "role": "disk"})

    got = client.get_region(a)
    assert got == made
    assert [r.name for r in client.list_regions({"suite": "client"})] == sorted([a, b])
    assert [r.name for r in client.list_regions({"suite": "client", "role": "disk"})] == [b]
    assert client.list_regions({"suite": "nope"}) == []
    assert {a, b} <= {r.name for r in client.list_regions()}

    st = client.status()
    assert st.regions == before.regions + 2
    assert st.socket == str(daemon.socket) and st.fd_socket == str(daemon.fd_socket)
    assert st.version and st.uptime_seconds > 0 and st.threads >= 1
    assert st.madv_populate is True
    assert st.quota_bytes in (None, 0)

    client.delete_region(a)
    with pytest.raises(NotFound) as info:
        client.get_region(a)
    assert info.value.code == "NOT_FOUND"
    assert [r.name for r in client.list_regions({"suite": "client"})] == [b]
    client.delete_region(b)
    assert client.status().regions == before.regions


# --------------------------------------------------------------------------- plug


@pytest.mark.parametrize("size", [128 * MiB, 1 * GiB], ids=["128M", "1G"])
def test_plug_reports_progress_and_result(client: Client, size: int) -> None:
    """128 MiB is two 64 MiB chunks that finish within a few ms of each other."""
    name = fresh()
    client.create_region(name, size)
    seen: list[tuple[int, int]] = []
    result = client.plug(name, progress=lambda done, total: seen.append((done, total)))
    try:
        assert seen, "no progress reported"
        done = [d for d, _ in seen]
        assert done == sorted(done), f"progress went backwards: {seen}"
        assert {t for _, t in seen} == {size}, f"total changed: {seen}"
        assert seen[-1] == (size, size), (
            f"the last progress the callback saw is {seen[-1]}, not done == total "
            f"({len(seen)} calls: {seen})"
        )
        assert result.bytes == size
        assert result.seconds > 0
        assert result.strategy and result.strategy != "none"
        assert result.threads >= 1
        assert result.region.name == name
        assert result.region.plugged == [(0, size)]
        assert result.region.plugged_bytes == result.region.allocated_bytes == size
    finally:
        client.delete_region(name)


def test_plug_without_length_plugs_to_the_end(client: Client) -> None:
    name = fresh()
    client.create_region(name, 64 * MiB)
    tail = client.plug(name, 32 * MiB)  # offset only: to the end
    assert tail.bytes == 32 * MiB and tail.region.plugged == [(32 * MiB, 32 * MiB)]
    whole = client.plug(name)
    assert whole.bytes == 32 * MiB, "already plugged blocks are not counted again"
    assert whole.region.plugged == [(0, 64 * MiB)]
    assert client.get_region(name).allocated_bytes == 64 * MiB
    unplugged = client.unplug(name, 0, 16 * MiB)
    assert unplugged.bytes == 16 * MiB and unplugged.region.plugged == [(16 * MiB, 48 * MiB)]
    discarded = client.discard(name, 16 * MiB)  # offset only: to the end
    assert discarded.bytes == 48 * MiB
    assert discarded.region.plugged == [(16 * MiB, 48 * MiB)]
    populated = client.populate(name, 16 * MiB)
    assert populated.bytes == 48 * MiB
    client.delete_region(name)


def test_cancel_mid_plug_rolls_back(client: Client) -> None:
    name = fresh()
    client.create_region(name, 4 * GiB)
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            cancel.set()

    try:
        start = time.monotonic()
        with pytest.raises(Cancelled) as info:
            client.plug(name, progress=progress, cancel=cancel)
        assert time.monotonic() - start < 10
        assert seen and max(seen) < 4 * GiB, f"cancelled after the plug was done: {seen}"
        region = wait_until(
            "rollback",
            lambda: client.get_region(name),
            lambda r: r.allocated_bytes == 0 and r.plugged_bytes == 0,
        )
        assert region.plugged == []
        assert info.value.code == "CANCELLED", (
            f"Client documents .code set to the status name on every error; got "
            f"{info.value.code!r} on {info.value!r}"
        )
    finally:
        client.delete_region(name)


# --------------------------------------------------------------------------- errors


def test_errors_are_typed_with_codes(daemon: DaemonProcess, client: Client) -> None:
    name = fresh()
    client.create_region(name, 16 * MiB)
    cases: list[tuple[type[MemplugError], str, Callable[[], object]]] = [
        (NotFound, "NOT_FOUND", lambda: client.get_region("no-such-region")),
        (NotFound, "NOT_FOUND", lambda: client.plug("no-such-region", 0, 2 * MiB)),
        (NotFound, "NOT_FOUND", lambda: client.unplug("no-such-region", 0, 2 * MiB)),
        (NotFound, "NOT_FOUND", lambda: client.delete_region("no-such-region")),
        (NotFound, "NOT_FOUND", lambda: client.ticket("no-such-region")),
        (AlreadyExists, "ALREADY_EXISTS", lambda: client.create_region(name, 16 * MiB)),
        (InvalidArgument, "INVALID_ARGUMENT", lambda: client.create_region("Bad Name", MiB)),
        (InvalidArgument, "INVALID_ARGUMENT", lambda: client.plug(name, 4096, 2 * MiB)),
        (InvalidArgument, "INVALID_ARGUMENT", lambda: client.create_region(fresh(), 3 * MiB)),
    ]
    for cls, code, call in cases:
        with pytest.raises(MemplugError) as info:
            call()
        err = info.value
        assert type(err) is cls, f"expected {cls.__name__}, got {err!r}"
        assert err.code == code, f"{err!r}: code {err.code!r}"
        assert str(err), "an error must say what went wrong"
    assert daemon.alive()
    client.delete_region(name)


def test_pool_exhausted(client: Client, hugetlb_pool: Pool) -> None:
    hugetlb_pool(4)
    name = fresh()
    client.create_region(name, 64 * MiB, "hugetlb", page_size=HUGE_2M)
    try:
        with pytest.raises(ResourceExhausted) as info:
            client.plug(name)
        assert type(info.value) is PoolExhausted, repr(info.value)
        assert issubclass(PoolExhausted, ResourceExhausted)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        region = client.get_region(name)
        assert region.plugged == [] and region.allocated_bytes == 0
        assert huge_free() == 4, "the failed plug kept huge pages"
    finally:
        client.delete_region(name)


def test_unavailable_without_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "no-daemon.sock"
    with Client(socket=missing, timeout=5) as c:
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.status()
        assert time.monotonic() - start < 5
        with pytest.raises(Unavailable):
            c.plug("vm0")
    assert info.value.code == "UNAVAILABLE"
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------- attach


def test_attach_rw_then_ro(client: Client) -> None:
    name = fresh()
    client.create_region(name, 8 * MiB)
    client.plug(name)
    pattern = bytes(range(256)) * 64
    try:
        with client.attach(name) as rw:
            assert rw.writable and rw.info.access == "rw" and rw.size == 8 * MiB
            assert rw.info.backing == "shmem" and rw.name == name
            assert rw.view is not None and not rw.view.readonly
            rw.view[MiB : MiB + len(pattern)] = pattern
        with client.attach(name, "ro", populate="read") as ro:
            assert not ro.writable and ro.info.access == "ro"
            assert ro.view is not None and ro.view.readonly
            assert bytes(ro.view[MiB : MiB + len(pattern)]) == pattern
            with pytest.raises(TypeError):
                ro.view[0] = 1
            with pytest.raises(TypeError):
                ro.view[MiB : MiB + 4] = b"evil"
            assert bytes(ro.view[MiB : MiB + 4]) == pattern[:4]
        assert client.get_region(name).allocated_bytes == 8 * MiB
    finally:
        client.delete_region(name)


def test_attach_populate_write_on_partly_plugged_hugetlb(
    client: Client, hugetlb_pool: Pool
) -> None:
    hugetlb_pool(3)
    name = fresh()
    client.create_region(name, 32 * MiB, "hugetlb", page_size=HUGE_2M)
    try:
        client.plug(name, 0, 2 * MiB)
        client.plug(name, 16 * MiB, 2 * MiB)
        assert huge_free() == 1
        # Populating an unplugged block would take the one free page (or fail
        # for want of one); only the two plugged blocks may be faulted in.
        with client.attach(name, populate="write", sparse=True) as att:
            assert att.plugged == [(0, 2 * MiB), (16 * MiB, 2 * MiB)]
            assert att.populated_bytes == 4 * MiB
            assert att.mmap is not None and att.view is not None
            address = mapping_address(att.mmap)
            assert address is not None
            assert hugetlb_mapped(address) == 4 * MiB, "populate did not map the plugged blocks"
            assert huge_free() == 1, "populate touched an unplugged block"
            att.view[0:4] = b"head"
            att.view[16 * MiB : 16 * MiB + 4] = b"tail"
            assert bytes(att.view[16 * MiB : 16 * MiB + 4]) == b"tail"
        region = client.get_region(name)
        assert region.allocated_bytes == region.plugged_bytes == 4 * MiB
    finally:
        client.delete_region(name)


# --------------------------------------------------------------------------- private memory


def test_private_memory() -> None:
    with PrivateMemory(64 * MiB) as mem:
        assert mem.size == 64 * MiB and not mem.hugetlb
        assert not mem.view.readonly
        mem.view[0:4] = b"abcd"
        mem.view[64 * MiB - 4 :] = b"wxyz"
        assert bytes(mem.view[0:4]) == b"abcd" and bytes(mem.view[-4:]) == b"wxyz"


def test_private_memory_hugetlb(hugetlb_pool: Pool) -> None:
    hugetlb_pool(8)
    with PrivateMemory(8 * MiB, hugetlb=True) as mem:
        assert mem.hugetlb and mem.page_size == HUGE_2M
        assert huge_free() == 4, "PrivateMemory did not populate its huge pages"
        mem.view[0:4] = b"huge"
        assert bytes(mem.view[0:4]) == b"huge"
    assert huge_free() == 8


def test_private_memory_hugetlb_larger_than_pool(hugetlb_pool: Pool) -> None:
    hugetlb_pool(4)
    script = (
        "import sys\n"
        "from memplug.client import PrivateMemory, PoolExhausted\n"
        "try:\n"
        "    PrivateMemory(16 << 20, hugetlb=True)\n"
        "except PoolExhausted as exc:\n"
        "    print('PoolExhausted:', exc)\n"
        "    sys.exit(3)\n"
        "print('no error')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 3, (
        f"exit {proc.returncode} (-7 is SIGBUS)\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    assert proc.stdout.startswith("PoolExhausted: "), proc.stdout
    assert huge_free() == 4
