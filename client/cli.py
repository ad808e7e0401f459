"""memplug: the command line for memplugd.

Exit codes (also in the README):
  0 ok                      5 failed precondition (busy, unplugged blocks, ...)
  1 internal error          6 resource exhausted (pool, space, quota)
  2 invalid argument        7 permission denied
  3 not found               8 daemon unreachable
  4 already exists          124 deadline exceeded, 130 cancelled (Ctrl-C)
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import grp
import json
import os
import pwd
import re
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from memplug.client.client import Client
from memplug.client.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemplugError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from memplug.client.types import OperationResult, Region, Status
from memplug.common.paths import default_socket, runtime_dir
from memplug.common.sizes import GiB, MiB, format_size, parse_size

EXIT_CODES: dict[type[MemplugError], int] = {
    InvalidArgument: 2,
    OutOfRange: 2,
    NotFound: 3,
    AlreadyExists: 4,
    FailedPrecondition: 5,
    ResourceExhausted: 6,
    PermissionDenied: 7,
    Unavailable: 8,
    DeadlineExceeded: 124,
    Cancelled: 130,
}

F = TypeVar("F", bound=Callable[..., Any])


def exit_code(exc: MemplugError) -> int:
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """text with its line breaks escaped: an argument may carry them into a message."""
    return _LINE_BREAKS.sub(lambda m: m.group(0).encode("unicode_escape").decode(), text)


def fail(exc: MemplugError) -> NoReturn:
    if isinstance(exc, Unavailable):
        exc = explain_unreachable(exc)
    click.echo(f"memplug: {one_line(str(exc))}", err=True)
    sys.exit(exit_code(exc))


def _socket_in_use() -> tuple[Path, bool]:
    """The gRPC socket this run talks to, and whether nobody chose it (the default)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    chosen = root.obj.get("socket") if root is not None and root.obj else None  # --socket or env
    return (Path(chosen), False) if chosen else (default_socket(), True)


def _owner_and_group(st: os.stat_result) -> tuple[str, str]:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return owner, group


def explain_unreachable(exc: Unavailable) -> MemplugError:
    """Why the daemon's socket cannot be reached, when the socket itself tells.

    gRPC says only "failed to connect" (its message carries the errno text);
    a plain connect(2) to the same path tells a socket this user may not use
    (EACCES: exit 7, naming the group that may) from one where nobody listens.
    """
    path, by_default = _socket_in_use()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except PermissionError:
        return PermissionDenied(_permission_hint(path))
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ECONNREFUSED) and by_default:
            return Unavailable(f"{exc}; {_where_to_look(path)}")
        return exc
    finally:
        probe.close()
    return exc  # it answers now: the daemon was starting or restarting


def _permission_hint(path: Path) -> str:
    try:
        st = path.stat()
    except PermissionError:  # a directory on the way cannot be searched
        parent = path.parent
        try:
            pst = parent.stat()
        except OSError:
            return f"permission denied on {path}: you need root or the daemon's user"
        owner, group = _owner_and_group(pst)
        return (
            f"permission denied on {path}: its directory {parent} (owner {owner}, group "
            f"{group}, mode {stat.S_IMODE(pst.st_mode):o}) cannot be searched by you; "
            f"you need to be in group {group} or root"
        )
    owner, group = _owner_and_group(st)
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWGRP:
        return (
            f"permission denied on {path}: you need to be in group {group} (the socket's "
            f"group, mode {mode:o}) or root; memplugd --socket-group GROUP chooses the group"
        )
    return (
        f"permission denied on {path} (owner {owner}, mode {mode:o}): only {owner} or root "
        f"may use it; memplugd --socket-mode 660 --socket-group GROUP opens it to a group"
    )


SYSTEM_SOCKET = Path("/run/memplug/memplug.sock")


def _where_to_look(path: Path) -> str:
    """Where memplug looked (the default), and the other place a daemon may listen."""
    said = f"memplug looks in {runtime_dir()} unless told --socket PATH or $MEMPLUG_SOCKET"
    if path != SYSTEM_SOCKET and SYSTEM_SOCKET.exists():
        return f"{said}; a daemon run as root listens on {SYSTEM_SOCKET}: --socket {SYSTEM_SOCKET}"
    return f"{said}; start one with `make run` or memplugd"


U64_MAX = (1 << 64) - 1  # sizes and offsets are uint64 in the API
U32 = click.IntRange(0, (1 << 32) - 1)  # uids, gids, NUMA nodes and threads are uint32


class InputError(click.ClickException):
    """A usage error (bad option, missing argument, bad value), shown as one line.

    click prints usage errors on several lines (usage, hint, error); memplug's
    errors are one line each, whatever their cause, with the same exit code 2.
    """

    exit_code = 2

    def __init__(self, exc: click.UsageError, argv: list[str] | None = None) -> None:
        ctx = exc.ctx
        verb = f"{ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        super().__init__(f"{verb}{_negative_number(exc, argv or []) or exc.format_message()}{hint}")

    def show(self, file: Any = None) -> None:
        click.echo(f"memplug: {one_line(self.format_message())}", err=True)


# A negative size, offset or count as typed ("-1G", "-0x10", "-2"): click reads it as
# an unknown short option, "-1", and would say "No such option".
NEGATIVE_NUMBER = re.compile(r"-(?:0x[0-9a-f]*|[0-9][0-9._]*)[a-z]*", re.IGNORECASE)
ARGV_KEY = "memplug.argv"  # ctx.meta: the arguments as typed, for messages that quote them


def _negative_number(exc: click.UsageError, argv: list[str]) -> str | None:
    """'-1G' is not a size, rather than 'No such option: -1'."""
    if not isinstance(exc, click.NoSuchOption) or not NEGATIVE_NUMBER.match(exc.option_name):
        return None
    typed = next(
        (a for a in argv if a.startswith(exc.option_name) and NEGATIVE_NUMBER.fullmatch(a)),
        exc.option_name,
    )
    return f"{typed}: sizes, offsets and lengths cannot be negative"


class Cli(click.Group):
    """The memplug group: usage errors of the group and of every verb become InputError."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise InputError(exc, argv) from None
        ctx.meta[ARGV_KEY] = argv
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a verb's own arguments (parsed in here)
            raise InputError(exc, ctx.meta.get(ARGV_KEY)) from None


class Size(click.ParamType[int, Any]):
    """Byte counts with units: 512M, 2G, 1GiB, 0x200000, 4096."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except InvalidArgument as exc:
            self.fail(str(exc), param, ctx)
        if not 0 <= size <= U64_MAX:
            self.fail(f"{value!r} is out of range: at most 16 EiB - 1 ({U64_MAX:#x})", param, ctx)
        return size


SIZE = Size()


class RangeSpec(click.ParamType[tuple[int, int], Any]):
    """OFFSET:LENGTH, each a size as SIZE takes it: 0:2M, 1G:512M, 0x200000:0x200000."""

    name = "offset:length"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        offset, sep, length = str(value).partition(":")
        if not sep or not offset or not length:
            self.fail(f"{value!r} is not OFFSET:LENGTH (e.g. 1G:2M)", param, ctx)
        return SIZE.convert(offset, param, ctx), SIZE.convert(length, param, ctx)


RANGE = RangeSpec()


def _emit(ctx: click.Context, data: Any, human: Callable[[], None]) -> None:
    if ctx.obj["json"]:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human()


def command(group: click.Group, name: str, **kw: Any) -> Callable[[F], F]:
    """A verb with --json and MemplugError -> one line and an exit code."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, json_out: bool, **kwargs: Any) -> Any:
            ctx = click.get_current_context()
            ctx.obj["json"] = ctx.obj["json"] or json_out
            try:
                return fn(*args, **kwargs)
            except MemplugError as exc:
                fail(exc)

        run = click.option("--json", "json_out", is_flag=True, help="machine-readable output")(run)
        return group.command(name, **kw)(run)  # type: ignore[return-value]

    return wrap


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    envvar="MEMPLUG_SOCKET",
    # readable=False: click would check R_OK with access(2), which ignores
    # capabilities and is the wrong permission for a socket anyway.
    type=click.Path(dir_okay=False, readable=False),
    help="memplugd's gRPC socket [env MEMPLUG_SOCKET; default /run/memplug/memplug.sock as "
    "root, else $XDG_RUNTIME_DIR/memplug/memplug.sock, or /tmp/memplug-UID/memplug.sock "
    "without XDG_RUNTIME_DIR: where memplugd run as the same user listens]",
)
@click.option("--json", "json_out", is_flag=True, help="machine-readable output for every verb")
@click.version_option(package_name="memplug", prog_name="memplug", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, json_out: bool) -> None:
    """Plug, populate and hand over memory held by memplugd.

    Sizes, offsets and lengths take bytes (4096), hex (0x200000) or binary
    units (512M, 2G, 1GiB; K = 1024). Exit codes: 0 ok, 1 internal error,
    2 invalid argument, 3 not found, 4 already exists, 5 failed precondition,
    6 resource exhausted, 7 permission denied, 8 daemon unreachable,
    124 deadline exceeded, 130 cancelled.
    """
    ctx.obj = {"socket": socket, "json": json_out}


def client() -> Client:
    return Client(click.get_current_context().obj["socket"])


# --------------------------------------------------------------------------- output


def region_dict(r: Region) -> dict[str, Any]:
    return dataclasses.asdict(r)


def charged_to(r: Region) -> str:
    if r.charge_to_peer and not r.charge_cgroup:
        return "its first attacher's cgroup (not attached yet: plug waits for it)"
    if r.charge_cgroup:
        whose = " (its first attacher's)" if r.charge_to_peer else ""
        hugetlb = f", hugetlb cgroup {r.charge_hugetlb_cgroup}" if r.charge_hugetlb_cgroup else ""
        return f"memory cgroup {r.charge_cgroup}{hugetlb}{whose}"
    return "the daemon"


def show_region(r: Region) -> None:
    rows = [
        ("name", r.name),
        ("backing", r.backing + (f" ({r.path})" if r.path else "")),
        ("size", f"{format_size(r.size)} ({r.size})"),
        ("page size", format_size(r.page_size)),
        ("block size", format_size(r.block_size)),
        ("plugged", f"{format_size(r.plugged_bytes)} in {len(r.plugged)} range(s)"),
        ("allocated", format_size(r.allocated_bytes)),
        ("owner uid", str(r.owner_uid)),
        ("charged to", charged_to(r)),
    ]
    if r.allocated_outside_plugged_bytes:
        rows.insert(
            -1,
            (
                "outside",
                f"{format_size(r.allocated_outside_plugged_bytes)} allocated outside plugged "
                "blocks by the region's holders (counted by the quota; unplug frees it)",
            ),
        )
    if r.damage:
        rows.insert(1, ("DAMAGED", r.damage))
    if r.allowed_uids or r.allowed_gids:
        rows.append(("allowed", f"uids {r.allowed_uids or '-'} gids {r.allowed_gids or '-'}"))
    if r.read_only_uids or r.read_only_gids:
        rows.append(("read-only", f"uids {r.read_only_uids or '-'} gids {r.read_only_gids or '-'}"))
    options = [
        name
        for name, on in (
            ("thp", r.transparent_huge_pages),
            ("locked", r.lock),
            ("warm pool", r.from_warm_pool),
        )
        if on
    ]
    if r.numa_policy != "default":
        options.append(f"numa {r.numa_policy} {r.numa_nodes}")
    if options:
        rows.append(("options", ", ".join(options)))
    if r.labels:
        rows.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items()))))
    for key, value in rows:
        click.echo(f"{key:>11}: {value}")
    for offset, length in r.plugged:
        click.echo(f"{'':>11}  [{offset:#x}, {offset + length:#x})  {format_size(length)}")


def show_result(verb: str, name: str, res: OperationResult) -> None:
    rate = res.bytes / res.seconds / GiB if res.seconds > 0 else 0.0
    zeroing = f", zeroing {res.zeroing}" if res.zeroing else ""
    click.echo(
        f"{verb} {name}: {format_size(res.bytes)} in {res.seconds * 1e3:.1f} ms "
        f"({rate:.2f} GiB/s, {res.strategy}, {res.threads} thread(s){zeroing}); "
        f"plugged {format_size(res.region.plugged_bytes)} of {format_size(res.region.size)}"
    )


def parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


# --------------------------------------------------------------------------- regions


@command(cli, "create")
@click.argument("name")
@click.argument("size", type=SIZE, required=False)
@click.option(
    "--backing",
    "-b",
    type=click.Choice(["shmem", "hugetlb", "file"]),
    default="shmem",
    help="shmem: 4 KiB pages; hugetlb: from the huge page pool (size it first); "
    "file: a sparse file under the daemon's --allow-dir",
)
@click.option("--page-size", type=SIZE, default=0, help="hugetlb page size (2M, 1G)")
@click.option("--block-size", type=SIZE, default=0, help="unit of plug (default 2M)")
@click.option(
    "--path",
    default="",
    help="FILE regions: the file, inside an allowed dir (an existing file without SIZE "
    "is adopted at its size)",
)
@click.option("--label", "-l", multiple=True, help="KEY=VALUE (repeatable)")
@click.option(
    "--owner-uid", type=U32, default=None, help="uid owning the region (default: the daemon's uid)"
)
@click.option("--allow-uid", type=U32, multiple=True, help="uid that may attach (repeatable)")
@click.option("--allow-gid", type=U32, multiple=True, help="gid that may attach (repeatable)")
@click.option("--ro-uid", type=U32, multiple=True, help="uid that may attach read-only")
@click.option("--ro-gid", type=U32, multiple=True, help="gid that may attach read-only")
@click.option(
    "--thp/--no-thp", default=None, help="shmem: transparent huge pages (default: when allowed)"
)
@click.option(
    "--numa-policy",
    type=click.Choice(["default", "bind", "preferred", "interleave"]),
    default="default",
)
@click.option("--numa-node", type=U32, multiple=True, help="node for --numa-policy (repeatable)")
@click.option("--lock", is_flag=True, help="mlock plugged blocks")
@click.option(
    "--charge-cgroup",
    default="",
    metavar="PATH",
    help="charge the memory to this cgroup (as /proc/PID/cgroup prints it)",
)
@click.option(
    "--charge-to-peer",
    is_flag=True,
    help="charge the memory to the cgroups of the process that first attaches the region "
    "(plug is refused until then)",
)
def create_cmd(
    name: str,
    size: int | None,
    backing: str,
    page_size: int,
    block_size: int,
    path: str,
    label: tuple[str, ...],
    owner_uid: int | None,
    allow_uid: tuple[int, ...],
    allow_gid: tuple[int, ...],
    ro_uid: tuple[int, ...],
    ro_gid: tuple[int, ...],
    thp: bool | None,
    numa_policy: str,
    numa_node: tuple[int, ...],
    lock: bool,
    charge_cgroup: str,
    charge_to_peer: bool,
) -> None:
    """Create region NAME of SIZE (512M, 2G, 0x40000000): nothing is allocated until plug.

    SIZE is required, except for a FILE region adopting an existing file
    (-b file --path FILE), which takes the file's size.
    """
    if size is None and backing != "file":
        raise click.UsageError(
            f"missing argument SIZE: a {backing} region needs one (e.g. `create {name} 1G`); "
            "only a file region adopting an existing file takes the file's size",
            click.get_current_context(),
        )
    with client() as c:
        region = c.create_region(
            name,
            size or 0,
            backing,
            page_size=page_size,
            block_size=block_size,
            path=path,
            labels=parse_labels(label),
            owner_uid=owner_uid,
            allowed_uids=list(allow_uid),
            allowed_gids=list(allow_gid),
            read_only_uids=list(ro_uid),
            read_only_gids=list(ro_gid),
            transparent_huge_pages=thp,
            numa_policy=numa_policy,
            numa_nodes=list(numa_node),
            lock=lock,
            charge_cgroup=charge_cgroup,
            charge_to_peer=charge_to_peer,
        )
    ctx = click.get_current_context()
    _emit(ctx, region_dict(region), lambda: show_region(region))


@command(cli, "ls")
@click.option("--label", "-l", multiple=True, help="only regions with KEY=VALUE (repeatable)")
def ls_cmd(label: tuple[str, ...]) -> None:
    """List regions."""
    with client() as c:
        regions = c.list_regions(parse_labels(label))

    def human() -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for col in ("NAME", "BACKING", "SIZE", "PLUGGED", "ALLOCATED", "PAGE", "LABELS"):
            table.add_column(
                col, justify="right" if col in ("SIZE", "PLUGGED", "ALLOCATED") else "left"
            )
        for r in regions:
            table.add_row(
                r.name,
                r.backing + (" DAMAGED" if r.damage else ""),
                format_size(r.size),
                format_size(r.plugged_bytes),
                format_size(r.allocated_bytes),
                format_size(r.page_size),
                ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())),
            )
        Console().print(table)

    _emit(click.get_current_context(), [region_dict(r) for r in regions], human)


@command(cli, "show")
@click.argument("name")
def show_cmd(name: str) -> None:
    """Show region NAME with its plugged ranges."""
    with client() as c:
        region = c.get_region(name)
    _emit(click.get_current_context(), region_dict(region), lambda: show_region(region))


@command(cli, "rm")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(names: tuple[str, ...]) -> None:
    """Delete regions (memory lives on while clients hold their fds).

    All or nothing: every NAME is looked up first, and if any is missing none
    is deleted (exit 3, naming the missing ones).
    """
    names = tuple(dict.fromkeys(names))  # a name given twice is deleted once
    with client() as c:
        missing = []
        for name in names:
            try:
                c.get_region(name)
            except NotFound:
                missing.append(name)
        if missing:
            raise NotFound(
                f"no region named {', '.join(missing)}; nothing deleted "
                f"(`memplug ls` lists the regions)"
            )
        deleted: list[str] = []
        for name in names:
            try:
                c.delete_region(name)
            except MemplugError as exc:  # deleted by someone else meanwhile, or a daemon error
                done = f"deleted {', '.join(deleted)}; " if deleted else "nothing deleted; "
                raise type(exc)(f"{done}{name}: {exc}") from None
            deleted.append(name)
    _emit(
        click.get_current_context(),
        {"deleted": list(names)},
        lambda: click.echo(f"deleted {', '.join(names)}"),
    )


# --------------------------------------------------------------------------- ranges


ROLLBACK_WAIT = 5.0  # seconds Ctrl-C waits for the daemon to confirm a plug's rollback


def _cancelled_plug(
    c: Client, name: str, offset: int, length: int | None, ranges: tuple[tuple[int, int], ...] = ()
) -> Cancelled:
    """What a cancelled plug left, as the daemon shows it: wait (bounded) until it says.

    The client's cancel ends the call at once, but the daemon releases the
    memory afterwards (seconds for many GiB), and a cancel that arrives as
    the plug finishes finds nothing to undo. A plug is all or nothing, so once
    no call runs on the region the range tells which: plugged whole, the plug
    was done; otherwise the daemon has rolled it back.
    """
    deadline = time.monotonic() + ROLLBACK_WAIT
    try:
        while True:
            region = c.get_region(name)
            if region.operations_running == 0:
                asked = ranges or ((offset, (length or region.size - offset)),)
                covered = sum(
                    max(0, min(o + n, start + size) - max(o, start))
                    for start, size in asked
                    for o, n in region.plugged
                )
                if covered >= sum(size for _, size in asked):
                    return Cancelled(
                        f"plug {name}: cancelled too late: the daemon had finished the plug "
                        f"(plugged {format_size(region.plugged_bytes)}); unplug gives it back"
                    )
                return Cancelled(f"plug {name}: cancelled; the daemon rolled back what it had done")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except (MemplugError, KeyboardInterrupt):
        pass  # the region went away or a second Ctrl-C: report what is known
    return Cancelled(
        f"plug {name}: cancelled; the daemon is still rolling back; "
        f"`memplug show {name}` follows it"
    )


def format_rate(bytes_per_second: float) -> str:
    """2.23 GiB/s, 512 MiB/s: a speed steady enough to read while it changes."""
    if bytes_per_second >= GiB:
        return f"{bytes_per_second / GiB:.2f} GiB/s"
    if bytes_per_second >= MiB:
        return f"{bytes_per_second / MiB:.0f} MiB/s"
    return f"{format_size(int(bytes_per_second))}/s"


def progress_columns() -> tuple[Any, ...]:
    """The progress bar's columns: sizes and speed in binary units, as everywhere else."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        ProgressColumn,
        Task,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        """GiB/s (rich's TransferSpeedColumn speaks decimal MB/s only)."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            return Text(format_rate(speed), style="progress.data.speed")

    return (
        "{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
        TimeRemainingColumn(),
    )


def _run_streaming(
    verb: str,
    name: str,
    call: Callable[..., OperationResult],
    on_cancel: Callable[[], Cancelled] | None = None,
) -> None:
    """Run a plug or populate with a progress bar; Ctrl-C cancels it (exit 130).

    on_cancel: what to say after Ctrl-C (default: nothing was left to undo).
    """
    ctx = click.get_current_context()
    interactive = sys.stderr.isatty() and not ctx.obj["json"]
    try:
        if interactive:
            from rich.progress import Progress

            with Progress(*progress_columns(), transient=True) as bar:
                task = bar.add_task(f"{verb} {name}", total=None)
                result = call(
                    progress=lambda done, total: bar.update(task, completed=done, total=total)
                )
        else:
            result = call(progress=None)
    except KeyboardInterrupt:
        if on_cancel is not None:
            fail(on_cancel())
        fail(Cancelled(f"{verb} {name}: cancelled; it allocates nothing, so nothing to undo"))
    _emit(ctx, dataclasses.asdict(result), lambda: show_result(verb, name, result))


def _range_args(fn: F) -> F:
    fn = click.argument("length", type=SIZE, required=False)(fn)
    fn = click.argument("offset", type=SIZE, required=False, default=0)(fn)
    return click.argument("name")(fn)


# The help of every verb that takes a range (\b: click keeps the lines as they are).
RANGE_HELP = """
    \b
    OFFSET and LENGTH: bytes (4096), hex (0x200000) or binary units
    (512M, 2G, 1GiB; K = 1024), multiples of the region's block size.
    No OFFSET: the whole region. No LENGTH: from OFFSET to the end."""


def _with_range_help(fn: F) -> F:
    fn.__doc__ = f"{fn.__doc__}\n{RANGE_HELP}"
    return fn


def _ranges_option(fn: F) -> F:
    return click.option(
        "--range",
        "ranges",
        type=RANGE,
        multiple=True,
        metavar="OFFSET:LENGTH",
        help="a range of the region (sizes as for OFFSET and LENGTH), instead of "
        "OFFSET and LENGTH; repeat it to name several, done in one call, all or "
        "nothing (e.g. --range 0:2M --range 1G:2M)",
    )(fn)


@command(cli, "plug")
@_range_args
@_ranges_option
@click.option(
    "--strategy",
    type=click.Choice(["auto", "fallocate", "populate-write"]),
    default="auto",
    help="how to allocate: auto (default) lets the daemon choose per backing, "
    "fallocate(2) on one thread for shmem and file, MADV_POPULATE_WRITE over "
    "threads for hugetlb; fallocate or populate-write force one (to compare them)",
)
@click.option("--threads", type=U32, default=0, help="most worker threads (default: daemon's)")
@_with_range_help
def plug_cmd(
    name: str,
    offset: int,
    length: int | None,
    ranges: tuple[tuple[int, int], ...],
    strategy: str,
    threads: int,
) -> None:
    """Allocate backing memory for NAME [OFFSET [LENGTH]] (default: all of it).

    All or nothing: if it cannot finish (pool empty, quota, Ctrl-C) what it
    allocated is released and blocks plugged before keep their contents."""
    with client() as c:
        _run_streaming(
            "plug",
            name,
            functools.partial(
                c.plug, name, offset, length, ranges=ranges, strategy=strategy, threads=threads
            ),
            on_cancel=lambda: _cancelled_plug(c, name, offset, length, ranges),
        )


@command(cli, "populate")
@_range_args
@click.option("--mode", type=click.Choice(["read", "write"]), default="write")
@click.option("--threads", type=U32, default=0, help="most worker threads (default: daemon's)")
@_with_range_help
def populate_cmd(name: str, offset: int, length: int | None, mode: str, threads: int) -> None:
    """Prefault plugged memory of NAME [OFFSET [LENGTH]]."""
    with client() as c:
        _run_streaming(
            "populate",
            name,
            functools.partial(c.populate, name, offset, length, mode=mode, threads=threads),
        )


@command(cli, "unplug")
@_range_args
@_ranges_option
@_with_range_help
def unplug_cmd(
    name: str, offset: int, length: int | None, ranges: tuple[tuple[int, int], ...]
) -> None:
    """Free NAME [OFFSET [LENGTH]] and mark it unplugged."""
    with client() as c:
        res = c.unplug(name, offset, length, ranges=ranges)
    _emit(
        click.get_current_context(),
        dataclasses.asdict(res),
        lambda: click.echo(f"unplug {name}: {format_size(res.bytes)} released"),
    )


@command(cli, "discard")
@_range_args
@_ranges_option
@_with_range_help
def discard_cmd(
    name: str, offset: int, length: int | None, ranges: tuple[tuple[int, int], ...]
) -> None:
    """Zero plugged memory of NAME [OFFSET [LENGTH]]; it stays plugged."""
    with client() as c:
        res = c.discard(name, offset, length, ranges=ranges)
    _emit(
        click.get_current_context(),
        dataclasses.asdict(res),
        lambda: click.echo(f"discard {name}: {format_size(res.bytes)} zeroed"),
    )


# --------------------------------------------------------------------------- hand-off


@command(cli, "ticket")
@click.argument("name")
@click.option("--ro", is_flag=True, help="read-only")
def ticket_cmd(name: str, ro: bool) -> None:
    """Issue a one-time ticket to attach NAME; a consumer redeems it on the fd socket."""
    with client() as c:
        ticket = c.ticket(name, "ro" if ro else "rw")
    region = ticket.region
    data = {
        "ticket": ticket.ticket,
        "fd_socket": ticket.fd_socket,
        "expires_in": ticket.expires_in,
        "access": ticket.access,
        "request_line": f"MEMPLUG/1 ATTACH {ticket.ticket}",
        "region": region_dict(region),
    }

    def human() -> None:
        click.echo(f"ticket:     {ticket.ticket}  (single use, {ticket.expires_in:g} s)")
        click.echo(f"fd socket:  {ticket.fd_socket}")
        click.echo(f"send:       MEMPLUG/1 ATTACH {ticket.ticket}\\n")
        click.echo(
            f"receive:    OK line + 1 fd (SCM_RIGHTS): {format_size(region.size)} "
            f"{region.backing}, {format_size(region.page_size)} pages; map it MAP_SHARED"
            f"{'|MAP_NORESERVE' if region.backing == 'hugetlb' else ''}"
        )

    _emit(click.get_current_context(), data, human)


# NAME, then any of :ro, :rw and :sparse (a partly plugged region, e.g. a VMM's hotplug memory)
REGION_SPEC = re.compile(r"([a-z0-9][a-z0-9._-]{0,62})((?::(?:ro|rw|sparse))*)")


def env_name(region: str) -> str:
    return "MEMPLUG_FD_" + re.sub(r"[^A-Z0-9]", "_", region.upper())


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.option(
    "--region",
    "-r",
    "regions",
    multiple=True,
    required=True,
    help="NAME, NAME:ro, NAME:sparse or NAME:ro:sparse (repeatable)",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(regions: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Attach regions and run COMMAND with their fds inherited.

    In COMMAND, {fd:NAME} becomes the fd number and {path:NAME} /proc/self/fd/N;
    MEMPLUG_FD_<NAME> is set in its environment. A region with unplugged blocks
    is refused (touching them can raise SIGBUS) unless given as NAME:sparse.

      memplug exec -r vm0 -- qemu-system-x86_64 ... mem-path={path:vm0}
    """  # fmt: skip
    env = dict(os.environ)
    subst: dict[str, str] = {}
    given: dict[str, str] = {}  # environment variable -> the region that set it
    wanted: list[tuple[str, str, bool, str]] = []  # (name, access, sparse, variable)
    try:
        # Every spec is checked before the first region is attached.
        for spec in regions:
            match = REGION_SPEC.fullmatch(spec)
            if match is None:
                raise InvalidArgument(
                    f"--region {spec!r}: use NAME, NAME:ro, NAME:sparse or NAME:ro:sparse"
                )
            name, modifiers = match.group(1), match.group(2).split(":")[1:]
            variable = env_name(name)
            if name == given.get(variable):
                raise InvalidArgument(f"--region {name} is given twice")
            if variable in given:
                raise InvalidArgument(
                    f"--region {given[variable]} and --region {name} both map to the "
                    f"environment variable {variable} (every character other than a "
                    f"letter or digit becomes _): attach one of them at a time"
                )
            given[variable] = name
            access = "ro" if "ro" in modifiers else "rw"
            wanted.append((name, access, "sparse" in modifiers, variable))
        with client() as c:
            for name, access, sparse, variable in wanted:
                attached = c.attach(name, access, map_memory=False, sparse=sparse)
                fd = attached.detach_fd()
                os.set_inheritable(fd, True)
                env[variable] = str(fd)
                subst[f"{{fd:{name}}}"] = str(fd)
                subst[f"{{path:{name}}}"] = f"/proc/self/fd/{fd}"
    except MemplugError as exc:
        fail(exc)
    pattern = re.compile("|".join(re.escape(k) for k in subst))
    argv = [pattern.sub(lambda m: subst[m.group(0)], arg) for arg in command]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        click.echo(f"memplug: cannot run {argv[0]}: {exc.strerror}", err=True)
        sys.exit(127)


@command(cli, "health")
def health_cmd() -> None:
    """Exit 0 if the daemon answers SERVING on grpc.health.v1 (for HEALTHCHECK)."""
    with client() as c:
        state = c.health()
    _emit(click.get_current_context(), {"status": state}, lambda: click.echo(state))
    if state != "SERVING":
        sys.exit(EXIT_CODES[Unavailable])


@command(cli, "status")
def status_cmd() -> None:
    """The daemon at a glance."""
    with client() as c:
        st = c.status()
    _emit(click.get_current_context(), dataclasses.asdict(st), lambda: show_status(st))


def show_status(st: Status) -> None:
    counted = st.plugged_bytes + st.allocated_outside_plugged_bytes
    of_quota = (
        f"of {format_size(st.quota_bytes)} ({100 * counted / st.quota_bytes:.0f}%)"
        if st.quota_bytes
        else "(no quota)"
    )
    if st.allocated_outside_plugged_bytes:
        # Holders allocated memory outside plugged blocks: the quota counts it too.
        quota = (
            f"{format_size(st.plugged_bytes)}; the quota counts {format_size(counted)} {of_quota}"
        )
    else:
        quota = f"{format_size(st.plugged_bytes)} {of_quota}"
    up = time.strftime("%H:%M:%S", time.gmtime(st.uptime_seconds))
    click.echo(f"memplugd {st.version}, up {up}, socket {st.socket}")
    click.echo(f"  regions:   {st.regions}")
    click.echo(f"  plugged:   {quota}")
    click.echo(f"  allocated: {format_size(st.allocated_bytes)}")
    if st.allocated_outside_plugged_bytes:
        click.echo(
            f"  outside plugged blocks: {format_size(st.allocated_outside_plugged_bytes)} "
            "allocated by holders of regions' fds (counted by the quota; `memplug show` tells "
            "which region, unplug frees it)"
        )
    click.echo(f"  threads:   {st.threads}")
    click.echo(f"  MADV_POPULATE: {'yes' if st.madv_populate else 'no (fallbacks in use)'}")
    thp = "allowed" if st.shmem_thp_allowed else f"off: {st.shmem_thp_hint}"
    click.echo(f"  shmem THP: {st.shmem_thp} ({thp})")
    click.echo(f"  NUMA nodes: {', '.join(map(str, st.numa_nodes))}")
    for w in st.warm_pools:
        click.echo(
            f"  warm pool {w.backing} {format_size(w.size)}: {w.ready} of {w.target} ready "
            f"({w.hits} hits, {w.misses} misses)"
        )
    for p in [*st.hugetlb_pools, *st.hugetlb_node_pools]:
        where = "" if p.node is None else f" node {p.node}"
        grown = (
            f", added by memplug {p.added_pages} of a budget of {p.budget_pages}"
            if p.budget_pages or p.added_pages
            else ""
        )
        click.echo(
            f"  hugetlb {format_size(p.page_size):>7}{where}: {p.free} free of {p.total} "
            f"(reserved {p.reserved}, surplus {p.surplus}{grown})"
        )


# The VMM verbs (vm-update, hold, release) register themselves on the group.
from memplug.client import cli_vm  # noqa: E402, F401


def main() -> None:
    cli(prog_name="memplug")


if __name__ == "__main__":
    main()
