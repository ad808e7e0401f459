"""FILE: a sparse regular file confined to the daemon's allowed directories."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Final

from memplug.common import memory
from memplug.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    MemplugError,
    NoSpace,
    PermissionDenied,
)
from memplug.common.sizes import format_size
from memplug.daemon.backings.base import Backing, BackingKind, MemPolicy
from memplug.daemon.kernel import ops
from memplug.daemon.kernel.memfd import restrict_inode


def _locate(path: str, allow_dirs: list[Path]) -> tuple[Path, str]:
    """(allowed dir, path relative to it) for path, with symlinks and '..' resolved.

    This lexical check gives a clear message; the enforcement is the kernel's
    (RESOLVE_BENEATH when opening, see _open_parent).
    """
    if not allow_dirs:
        raise FailedPrecondition(
            "FILE regions are disabled: start memplugd with --allow-dir DIR to allow them"
        )
    if not path:
        raise InvalidArgument("FILE regions need a path")
    if "\0" in path:
        raise InvalidArgument("path contains a NUL byte")
    candidate = Path(path) if os.path.isabs(path) else allow_dirs[0] / path
    try:
        real = Path(os.path.realpath(candidate, strict=False))
    except OSError as exc:  # a component changed while it was being resolved
        raise PermissionDenied(f"path {path!r} changed while it was resolved: {exc}") from None
    for base in allow_dirs:
        if real != base and real.is_relative_to(base):
            return base, str(real.relative_to(base))
    allowed = ", ".join(str(d) for d in allow_dirs)
    raise PermissionDenied(
        f"path {path!r} resolves to {real}, outside the allowed dirs ({allowed})"
    )


def _open_parent(base: Path, rel: str) -> int:
    """An O_PATH fd of rel's directory, which the kernel guarantees is beneath base.

    Everything after this is relative to that fd and to one name without
    symlinks (O_NOFOLLOW), so no swap of a path component, before or after,
    can make the daemon open, create or unlink anything outside base.
    """
    parent = os.path.dirname(rel) or "."
    base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            return ops.open_beneath(base_fd, parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            # Pre-5.6 kernel: only the realpath check guards inner components.
            return os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base_fd)
    finally:
        os.close(base_fd)


class FileBacking(Backing):
    kind = BackingKind.FILE
    holders_allocate_memory = False
    sealed_against_resize = False

    def __init__(
        self,
        fd: int,
        size: int,
        page_size: int,
        path: str,
        created: bool,
        parent_fd: int,
        *,
        mpol: MemPolicy | None = None,
    ) -> None:
        super().__init__(fd, size, page_size, path, mpol=mpol)
        self.created: Final = created
        self._parent_fd = parent_fd  # the file's directory, for a safe unlink
        st = os.fstat(fd)
        self.identity: Final = (st.st_dev, st.st_ino)

    @classmethod
    def open(
        cls,
        path: str,
        size: int,
        allow_dirs: list[Path],
        owner_uid: int,
        *,
        create: bool = True,
        mpol: MemPolicy | None = None,
        any_size: bool = False,
    ) -> FileBacking:
        """Open (or create) the file; size 0 adopts an existing file's size.

        A file memplug creates belongs to the region's owner, mode 0600; an
        adopted file keeps its owner and mode. any_size (a restart): open the
        file of a region of `size` whatever its size now; resized() then says
        what changed.
        """
        base, rel = _locate(path, allow_dirs)
        full, leaf = str(base / rel), os.path.basename(rel)
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            parent_fd = _open_parent(base, rel)
        except OSError as exc:
            raise _open_error(path, full, exc) from exc
        created = False
        try:
            try:
                fd = os.open(leaf, flags, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    raise FailedPrecondition(f"{full} no longer exists") from None
                if size == 0:  # refuse before creating anything
                    raise InvalidArgument(f"size must be > 0 to create {full}") from None
                fd = os.open(leaf, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=parent_fd)
                created = True
        except OSError as exc:
            os.close(parent_fd)
            raise _open_error(path, full, exc) from exc
        except BaseException:
            os.close(parent_fd)
            raise
        backing = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{full} is not a regular file")
            if created:
                os.ftruncate(fd, size)
                restrict_inode(fd, owner_uid)
            elif size == 0:
                size = st.st_size
                if size == 0:
                    raise InvalidArgument(f"{full} is empty: give a size to use it")
            elif size != st.st_size and not any_size:
                raise FailedPrecondition(
                    f"{full} exists with size {st.st_size}; ask for that size, or 0 to adopt it"
                )
            backing = cls(fd, size, memory.BASE_PAGE_SIZE, full, created, parent_fd, mpol=mpol)
            return backing
        except BaseException:
            if backing is None:
                backing = cls(fd, 0, memory.BASE_PAGE_SIZE, full, created, parent_fd)
            backing.discard_file()
            backing.close()
            raise

    def discard_file(self) -> None:
        """Undo a creation that never became a region (call before close()).

        Unlinks by name in the file's own directory fd, and only while that
        name is still this very file: a name swapped in meanwhile is left alone.
        """
        if not self.created or self.fd < 0 or self._parent_fd < 0:
            return
        leaf = os.path.basename(self.path)
        try:
            st = os.stat(leaf, dir_fd=self._parent_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(leaf, dir_fd=self._parent_fd)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        super().close()
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
            self._parent_fd = -1

    def resized(self) -> tuple[int, str] | None:
        # Regular files cannot be sealed: anyone with a read-write fd (the owner,
        # root) can ftruncate or fallocate(COLLAPSE_RANGE/INSERT_RANGE) them.
        with self._fd_lock:
            if self.fd < 0:
                return None
            now = os.fstat(self.fd).st_size
        if now == self.size:
            return None
        how = "truncated" if now < self.size else "extended"
        return now, (
            f"its file {self.path} was {how} from {format_size(self.size)} ({self.size} bytes) "
            f"to {format_size(now)} ({now} bytes) outside memplugd, by a process holding it "
            "read-write (regular files cannot be sealed against truncation); its contents "
            "may have moved or be gone, and touching blocks past the file's end raises "
            "SIGBUS: copy out what you need, then delete the region"
        )

    def error_for(self, exc: OSError, missing: int) -> MemplugError:
        # A population past a truncated end fails like a full filesystem (EFAULT):
        # say what really happened.
        found = self.resized()
        if found is not None:
            return FailedPrecondition(f"the region is damaged: {found[1]}")
        return super().error_for(exc, missing)

    def exhausted(self, missing: int) -> NoSpace:
        try:
            vfs = os.statvfs(self.path)
            free = f"{format_size(vfs.f_bavail * vfs.f_frsize)} free"
        except OSError:
            free = "free space unknown"
        return NoSpace(
            f"the filesystem holding {self.path} is full: {format_size(missing)} more "
            f"needed, {free}"
        )

    def describe(self) -> str:
        return f"file {self.path}"


def _open_error(path: str, full: str, exc: OSError) -> Exception:
    if exc.errno in (errno.EXDEV, errno.ELOOP):
        return PermissionDenied(f"path {path!r} leaves the allowed dir through a symlink or '..'")
    if exc.errno == errno.ENOENT:
        return InvalidArgument(f"the directory of {full} does not exist")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return InvalidArgument(f"{full} is not a regular file")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"cannot open {full}: {exc.strerror}")
    if exc.errno == errno.EEXIST:
        return FailedPrecondition(f"{full} appeared while it was being created; try again")
    return InvalidArgument(f"cannot open {full}: {exc.strerror}")
