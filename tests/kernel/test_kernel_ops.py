"""The kernel layer on the real kernel: memfds, seals, fallocate, mappings, openat2, hugetlb."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HUGE_2M, MiB, require

from memplug.common import memory
from memplug.daemon.config import Switches, environment_switches
from memplug.daemon.kernel import ops, probe, toucher
from memplug.daemon.kernel.memfd import REGION_SEALS, create_memfd

PAGE = memory.BASE_PAGE_SIZE


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Append fds here; they are closed after the test (before pool fixtures restore)."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def shmem_fd(fds: list[int], size: int, flags: int = ops.MFD_CLOEXEC) -> int:
    fd = ops.memfd_create("memplug-test", flags)
    fds.append(fd)
    os.ftruncate(fd, size)
    return fd


def hugetlb_fd(fds: list[int], size: int) -> int:
    require(probe.has_memfd_hugetlb(HUGE_2M), "no 2 MiB hugetlb memfds on this kernel")
    return shmem_fd(fds, size, ops.MFD_CLOEXEC | ops.huge_page_flag(HUGE_2M))


# --------------------------------------------------------------------------- memfd and seals


def test_memfd_seals(fds: list[int]) -> None:
    fd = shmem_fd(fds, 4 * MiB, ops.MFD_CLOEXEC | ops.MFD_ALLOW_SEALING)
    assert ops.get_seals(fd) == 0
    ops.add_seals(fd, ops.F_SEAL_SHRINK | ops.F_SEAL_GROW | ops.F_SEAL_SEAL)
    seals = ops.get_seals(fd)
    for seal in (ops.F_SEAL_SHRINK, ops.F_SEAL_GROW, ops.F_SEAL_SEAL):
        assert seals & seal
    assert not seals & ops.F_SEAL_WRITE
    for size in (2 * MiB, 8 * MiB):
        with pytest.raises(OSError) as info:
            os.ftruncate(fd, size)
        assert info.value.errno == errno.EPERM
    assert os.fstat(fd).st_size == 4 * MiB
    with pytest.raises(OSError, match="F_ADD_SEALS") as info:
        ops.add_seals(fd, ops.F_SEAL_WRITE)
    assert info.value.errno == errno.EPERM
    # The seals forbid resizing, not the hole punching the engine lives on.
    ops.fallocate(fd, 0, 2 * MiB)
    ops.punch_hole(fd, 0, 2 * MiB)


def test_memfd_without_allow_sealing_is_sealed_shut(fds: list[int]) -> None:
    fd = shmem_fd(fds, PAGE)
    assert ops.get_seals(fd) & ops.F_SEAL_SEAL
    with pytest.raises(OSError) as info:
        ops.add_seals(fd, ops.F_SEAL_GROW)
    assert info.value.errno == errno.EPERM


def test_region_memfd_carries_the_region_seals(fds: list[int]) -> None:
    fd = create_memfd("seals", 4 * MiB, os.geteuid())
    fds.append(fd)
    assert ops.get_seals(fd) & REGION_SEALS == REGION_SEALS
    assert os.fstat(fd).st_size == 4 * MiB
    with pytest.raises(OSError) as info:
        os.ftruncate(fd, 0)
    assert info.value.errno == errno.EPERM


def test_region_memfd_that_cannot_be_sized_names_the_step_and_leaks_no_fd() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match=r"^\[Errno \d+\] ftruncate: ") as info:
        create_memfd("negative", -1, os.geteuid())
    assert info.value.errno in (errno.EINVAL, errno.EFBIG)
    assert set(os.listdir("/proc/self/fd")) <= before, "the half-made memfd was not closed"


def test_memfd_create_error_is_an_oserror_with_the_step() -> None:
    with pytest.raises(OSError, match="memfd_create") as info:
        ops.memfd_create("bad", 0x7FFF_0000)  # undefined flag bits
    assert info.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- allocation


def test_fallocate_and_punch_hole_change_allocated_bytes_exactly(fds: list[int]) -> None:
    fd = shmem_fd(fds, 16 * MiB)
    assert ops.allocated_bytes(fd) == 0
    ops.fallocate(fd, 2 * MiB, 4 * MiB)
    assert ops.allocated_bytes(fd) == 4 * MiB
    ops.fallocate(fd, 4 * MiB, 4 * MiB)  # half overlaps: only 2 MiB are new
    assert ops.allocated_bytes(fd) == 6 * MiB
    ops.punch_hole(fd, 3 * MiB, PAGE)
    assert ops.allocated_bytes(fd) == 6 * MiB - PAGE
    ops.punch_hole(fd, 0, 16 * MiB)
    assert ops.allocated_bytes(fd) == 0
    # KEEP_SIZE: fallocate never changes the size.
    assert os.fstat(fd).st_size == 16 * MiB


def test_punch_hole_zeroes_data(fds: list[int]) -> None:
    fd = shmem_fd(fds, 4 * MiB)
    os.pwrite(fd, b"x" * PAGE, MiB)
    ops.punch_hole(fd, MiB, PAGE)
    assert os.pread(fd, PAGE, MiB) == bytes(PAGE)


def test_fallocate_error_carries_errno_and_step(fds: list[int]) -> None:
    fd = shmem_fd(fds, 4 * MiB)
    with pytest.raises(OSError, match="fallocate") as info:
        ops.fallocate(fd, -PAGE, PAGE)
    assert info.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- mappings


def test_map_shared_and_populate_on_shmem(fds: list[int]) -> None:
    fd = shmem_fd(fds, 8 * MiB)
    with ops.map_shared(fd, 0, 8 * MiB) as m:
        memory.populate(m.address, 2 * MiB, write=True)
        assert ops.allocated_bytes(fd) == 2 * MiB
        # Populating shmem for read allocates its pages too.
        memory.populate(m.address + 2 * MiB, 2 * MiB, write=False)
        assert ops.allocated_bytes(fd) == 4 * MiB
        # The mapping is the file: writes through it are seen by pread, and back.
        ctypes.memmove(m.address + MiB, b"memplug", 7)
        assert os.pread(fd, 7, MiB) == b"memplug"
        os.pwrite(fd, b"written", 3 * MiB)
        assert ctypes.string_at(m.address + 3 * MiB, 7) == b"written"
    assert m.length == 0
    m.close()  # closing twice is fine


def test_map_shared_at_an_offset(fds: list[int]) -> None:
    fd = shmem_fd(fds, 8 * MiB)
    os.pwrite(fd, b"at 4 MiB", 4 * MiB)
    with ops.map_shared(fd, 4 * MiB, 2 * MiB) as m:
        assert ctypes.string_at(m.address, 8) == b"at 4 MiB"


def test_populate_past_eof_is_efault_not_sigbus(fds: list[int]) -> None:
    fd = shmem_fd(fds, 2 * MiB)
    with ops.map_shared(fd, 0, 4 * MiB) as m:
        with pytest.raises(OSError, match="MADV_POPULATE_WRITE") as info:
            memory.populate(m.address, 4 * MiB, write=True)
        assert info.value.errno == errno.EFAULT
    assert ops.allocated_bytes(fd) == 2 * MiB  # what it populated stays


def test_populate_write_on_a_read_only_mapping_is_einval(fds: list[int]) -> None:
    fd = shmem_fd(fds, 2 * MiB)
    with ops.map_shared(fd, 0, 2 * MiB, writable=False) as m:
        with pytest.raises(OSError) as info:
            memory.populate(m.address, 2 * MiB, write=True)
        assert info.value.errno == errno.EINVAL
        memory.populate(m.address, 2 * MiB, write=False)


def test_map_shared_error(fds: list[int]) -> None:
    fd = shmem_fd(fds, 2 * MiB)
    with pytest.raises(OSError, match="mmap") as info:
        ops.map_shared(fd, 1, PAGE)  # offset not page aligned
    assert info.value.errno == errno.EINVAL


def test_iter_chunks() -> None:
    assert list(ops.iter_chunks(10, 25, 10)) == [(10, 10), (20, 10), (30, 5)]
    assert list(ops.iter_chunks(0, 0, 10)) == []


# --------------------------------------------------------------------------- data extents


def test_data_extents_on_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 8 * MiB)
        assert ops.data_extents(fd, 0, 8 * MiB) == []
        os.pwrite(fd, b"a" * PAGE, MiB)
        os.pwrite(fd, b"b" * 10, 5 * MiB)
        os.pwrite(fd, b"c" * 2 * PAGE, 5 * MiB + PAGE)
        assert ops.data_extents(fd, 0, 8 * MiB) == [(MiB, PAGE), (5 * MiB, 3 * PAGE)]
        # Clipped to the range asked for.
        assert ops.data_extents(fd, MiB + PAGE, 4 * MiB) == [(5 * MiB, PAGE)]
        assert ops.data_extents(fd, 2 * MiB, 2 * MiB) == []
        assert ops.data_extents(fd, 6 * MiB, 2 * MiB) == []  # ENXIO: no data after it
    finally:
        os.close(fd)


def test_data_extents_on_shmem_ignore_fallocated_pages(fds: list[int]) -> None:
    fd = shmem_fd(fds, 8 * MiB)
    ops.fallocate(fd, 0, 8 * MiB)
    os.pwrite(fd, b"x", 2 * MiB)
    assert ops.data_extents(fd, 0, 8 * MiB) == [(2 * MiB, PAGE)]


# --------------------------------------------------------------------------- open_beneath


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[int]:
    """An O_PATH fd of tmp_path/jail, holding file, sub/inner and escaping links."""
    jail = tmp_path / "jail"
    (jail / "sub").mkdir(parents=True)
    (jail / "file").write_text("inside")
    (jail / "sub" / "inner").write_text("inner")
    (tmp_path / "secret").write_text("outside")
    (jail / "to-file").symlink_to("file")
    (jail / "to-inner").symlink_to("sub/inner")
    (jail / "sub" / "up").symlink_to("../file")  # leaves sub/, stays in the jail
    (jail / "escape").symlink_to("../secret")
    (jail / "absolute").symlink_to(tmp_path / "secret")
    (jail / "absolute-inside").symlink_to(jail / "file")
    dirfd = os.open(jail, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    yield dirfd
    os.close(dirfd)


def read_beneath(dirfd: int, path: str) -> str:
    fd = ops.open_beneath(dirfd, path, os.O_RDONLY)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("path", "content"),
    [("file", "inside"), ("sub/inner", "inner"), ("to-file", "inside"), ("to-inner", "inner"),
     ("sub/up", "inside"), ("sub/../file", "inside")],
)  # fmt: skip
def test_open_beneath_follows_links_that_stay_inside(jail: int, path: str, content: str) -> None:
    # Opened the way FileBacking opens files: no O_CREAT, the default mode.
    assert read_beneath(jail, path) == content


@pytest.mark.parametrize(
    "path",
    ["escape", "absolute", "absolute-inside", "../secret", "sub/../../secret", "/etc/passwd"],
)
def test_open_beneath_refuses_to_leave_the_dir(jail: int, path: str) -> None:
    with pytest.raises(OSError, match="openat2") as info:
        read_beneath(jail, path)
    assert info.value.errno in (errno.EXDEV, errno.ELOOP), os.strerror(info.value.errno or 0)


def test_open_beneath_opens_a_directory(jail: int) -> None:
    # O_DIRECTORY is one of O_TMPFILE's bits, but it creates nothing: openat2
    # must get mode 0 here too.
    fd = ops.open_beneath(jail, "sub", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(os.listdir(fd)) == ["inner", "up"]
    finally:
        os.close(fd)


def test_open_beneath_creates_with_the_mode(jail: int, tmp_path: Path) -> None:
    fd = ops.open_beneath(jail, "new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        assert os.get_inheritable(fd) is False  # O_CLOEXEC is always added
    finally:
        os.close(fd)
    assert (tmp_path / "jail" / "new").stat().st_mode & 0o777 == 0o640 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- probe


def test_probe_sees_madv_populate() -> None:
    assert memory.has_madv_populate() is True


def test_environment_switches_turn_madv_populate_and_the_memcg_check_off() -> None:
    assert environment_switches({}) == Switches(madv_populate=True, memcg_check=True)
    off = environment_switches({"MEMPLUG_DISABLE_MADV_POPULATE": "1", "MEMPLUG_MEMCG_CHECK": "0"})
    assert off == Switches(madv_populate=False, memcg_check=False)


def test_huge_page_sizes() -> None:
    sizes = memory.huge_page_sizes()
    assert HUGE_2M in sizes
    assert sizes == sorted(sizes)
    assert memory.default_huge_page_size() in sizes


def test_huge_page_flag_encodes_log2_of_the_size() -> None:
    assert ops.huge_page_flag(HUGE_2M) == ops.MFD_HUGETLB | (21 << 26)
    assert ops.huge_page_flag(1 << 30) == ops.MFD_HUGETLB | (30 << 26)


def test_huge_pool_reads_sysfs() -> None:
    pool = memory.huge_pool(HUGE_2M)
    assert pool.page_size == HUGE_2M
    assert 0 <= pool.free <= pool.total
    with pytest.raises(FileNotFoundError):
        memory.huge_pool(3 * MiB)


# --------------------------------------------------------------------------- hugetlb


def test_hugetlb_fallocate_beyond_the_pool_keeps_the_pages_it_got(
    hugetlb_pool: Callable[[int], None], fds: list[int]
) -> None:
    hugetlb_pool(2)
    fd = hugetlb_fd(fds, 8 * MiB)
    with pytest.raises(OSError, match="fallocate") as info:
        ops.fallocate(fd, 0, 8 * MiB)
    assert info.value.errno == errno.ENOSPC
    # The engine relies on this: ENOSPC does not give back what it got, so a
    # rollback must punch the range.
    assert ops.allocated_bytes(fd) == 2 * HUGE_2M
    ops.punch_hole(fd, 0, 8 * MiB)
    assert ops.allocated_bytes(fd) == 0
    # The pool has its pages back: they can be had again.
    ops.fallocate(fd, 4 * MiB, 2 * HUGE_2M)
    assert ops.allocated_bytes(fd) == 2 * HUGE_2M


def test_hugetlb_populate_past_the_pool_is_efault_not_sigbus(
    hugetlb_pool: Callable[[int], None], fds: list[int]
) -> None:
    hugetlb_pool(1)
    fd = hugetlb_fd(fds, 8 * MiB)
    # MAP_NORESERVE: a mapping larger than the pool can be made at all.
    with ops.map_shared(fd, 0, 8 * MiB) as m:
        with pytest.raises(OSError, match="MADV_POPULATE_WRITE") as info:
            memory.populate(m.address, 8 * MiB, write=True)
        assert info.value.errno == errno.EFAULT
    assert ops.allocated_bytes(fd) == HUGE_2M  # what it populated stays
    ops.punch_hole(fd, 0, 8 * MiB)
    assert ops.allocated_bytes(fd) == 0


def test_hugetlb_populate_within_the_pool(
    hugetlb_pool: Callable[[int], None], fds: list[int]
) -> None:
    hugetlb_pool(2)
    fd = hugetlb_fd(fds, 4 * MiB)
    with ops.map_shared(fd, 0, 4 * MiB) as m:
        memory.populate(m.address, 4 * MiB, write=True)
    assert ops.allocated_bytes(fd) == 4 * MiB


def test_touch_in_helper_reports_sigbus_as_efault_and_survives(
    hugetlb_pool: Callable[[int], None], fds: list[int]
) -> None:
    hugetlb_pool(0)
    fd = hugetlb_fd(fds, 2 * HUGE_2M)
    with pytest.raises(OSError, match="SIGBUS") as info:
        toucher.touch_in_helper(fd, 0, 2 * HUGE_2M, HUGE_2M)
    assert info.value.errno == errno.EFAULT
    # Still here (the helper took the signal), and nothing was allocated.
    assert ops.allocated_bytes(fd) == 0


def test_touch_in_helper_reads_backed_pages(
    hugetlb_pool: Callable[[int], None], fds: list[int]
) -> None:
    hugetlb_pool(2)
    fd = hugetlb_fd(fds, 2 * HUGE_2M)
    ops.fallocate(fd, 0, 2 * HUGE_2M)
    toucher.touch_in_helper(fd, 0, 2 * HUGE_2M, HUGE_2M)
    toucher.touch_in_helper(fd, HUGE_2M, HUGE_2M, HUGE_2M)


def test_touch_in_helper_reports_other_failures_as_eio(fds: list[int]) -> None:
    fd = shmem_fd(fds, 2 * MiB)
    with pytest.raises(OSError, match="helper exited") as info:
        toucher.touch_in_helper(fd, 0, 4 * MiB, PAGE)  # longer than the file
    assert info.value.errno == errno.EIO
