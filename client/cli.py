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
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
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
from memplug.common.sizes import format_size, parse_size

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
    click.echo(f"memplug: {one_line(str(exc))}", err=True)
    sys.exit(exit_code(exc))


U64_MAX = (1 << 64) - 1  # sizes and offsets are uint64 in the API
U32 = click.IntRange(0, (1 << 32) - 1)  # uids, gids, NUMA nodes and threads are uint32


class InputError(click.ClickException):
    """A usage error (bad option, missing argument, bad value), shown as one line.

    click prints usage errors on several lines (usage, hint, error); memplug's
    errors are one line each, whatever their cause, with the same exit code 2.
    """

    exit_code = 2

    def __init__(self, exc: click.UsageError) -> None:
        ctx = exc.ctx
        verb = f"{ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        super().__init__(f"{verb}{exc.format_message()}{hint}")

    def show(self, file: Any = None) -> None:
        click.echo(f"memplug: {one_line(self.format_message())}", err=True)


class Cli(click.Group):
    """The memplug group: usage errors of the group and of every verb become InputError."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise InputError(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a verb's own arguments (parsed in here)
            raise InputError(exc) from None


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
    "root, else $XDG_RUNTIME_DIR/memplug/memplug.sock]",
)
@click.option("--json", "json_out", is_flag=True, help="machine-readable output for every verb")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, json_out: bool) -> None:
    """Plug, populate and hand over memory held by memplugd."""
    ctx.obj = {"socket": socket, "json": json_out}


def client() -> Client:
    return Client(click.get_current_context().obj["socket"])


# --------------------------------------------------------------------------- output


def region_dict(r: Region) -> dict[str, Any]:
    return dataclasses.asdict(r)


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
        ("charged to", f"memory cgroup {r.charge_cgroup}" if r.charge_cgroup else "the daemon"),
    ]
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
    rate = res.bytes / res.seconds / 1e9 if res.seconds > 0 else 0.0
    zeroing = f", zeroing {res.zeroing}" if res.zeroing else ""
    click.echo(
        f"{verb} {name}: {format_size(res.bytes)} in {res.seconds * 1e3:.1f} ms "
        f"({rate:.2f} GB/s, {res.strategy}, {res.threads} thread(s){zeroing}); "
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
@click.argument("size", type=SIZE, required=False, default=0)
@click.option("--backing", "-b", type=click.Choice(["shmem", "hugetlb", "file"]), default="shmem")
@click.option("--page-size", type=SIZE, default=0, help="hugetlb page size (2M, 1G)")
@click.option("--block-size", type=SIZE, default=0, help="unit of plug (default 2M)")
@click.option("--path", default="", help="FILE regions: the file, inside an allowed dir")
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
def create_cmd(
    name: str,
    size: int,
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
) -> None:
    """Create region NAME of SIZE (nothing is allocated until plug)."""
    with client() as c:
        region = c.create_region(
            name,
            size,
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
                r.backing,
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
    """Delete regions (memory lives on while clients hold their fds)."""
    with client() as c:
        for name in names:
            c.delete_region(name)
    _emit(
        click.get_current_context(),
        {"deleted": list(names)},
        lambda: click.echo(f"deleted {', '.join(names)}"),
    )


# --------------------------------------------------------------------------- ranges


ROLLBACK_WAIT = 5.0  # seconds Ctrl-C waits for the daemon to confirm a plug's rollback


def _cancelled_plug(c: Client, name: str, offset: int, length: int | None) -> Cancelled:
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
                end = region.size if not length else offset + length
                covered = sum(max(0, min(o + n, end) - max(o, offset)) for o, n in region.plugged)
                if covered >= end - offset:
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
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (
                "{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, transient=True) as bar:
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


@command(cli, "plug")
@_range_args
@click.option(
    "--strategy",
    type=click.Choice(["auto", "fallocate", "populate-write"]),
    default="auto",
    help="how to allocate (auto: by backing and size)",
)
@click.option("--threads", type=U32, default=0, help="most worker threads (default: daemon's)")
def plug_cmd(name: str, offset: int, length: int | None, strategy: str, threads: int) -> None:
    """Allocate backing memory for NAME [OFFSET [LENGTH]] (default: all of it)."""
    with client() as c:
        _run_streaming(
            "plug",
            name,
            functools.partial(c.plug, name, offset, length, strategy=strategy, threads=threads),
            on_cancel=lambda: _cancelled_plug(c, name, offset, length),
        )


@command(cli, "populate")
@_range_args
@click.option("--mode", type=click.Choice(["read", "write"]), default="write")
@click.option("--threads", type=U32, default=0, help="most worker threads (default: daemon's)")
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
def unplug_cmd(name: str, offset: int, length: int | None) -> None:
    """Free NAME [OFFSET [LENGTH]] and mark it unplugged."""
    with client() as c:
        res = c.unplug(name, offset, length)
    _emit(
        click.get_current_context(),
        dataclasses.asdict(res),
        lambda: click.echo(f"unplug {name}: {format_size(res.bytes)} released"),
    )


@command(cli, "discard")
@_range_args
def discard_cmd(name: str, offset: int, length: int | None) -> None:
    """Zero plugged memory of NAME [OFFSET [LENGTH]]; it stays plugged."""
    with client() as c:
        res = c.discard(name, offset, length)
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


REGION_SPEC = re.compile(r"([a-z0-9][a-z0-9._-]{0,62})(?::(ro|rw))?")


def env_name(region: str) -> str:
    return "MEMPLUG_FD_" + re.sub(r"[^A-Z0-9]", "_", region.upper())


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.option(
    "--region", "-r", "regions", multiple=True, required=True, help="NAME or NAME:ro (repeatable)"
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(regions: tuple[str, ...], command: tuple[str, ...]) -> None:
    """Attach regions and run COMMAND with their fds inherited.

    In COMMAND, {fd:NAME} becomes the fd number and {path:NAME} /proc/self/fd/N;
    MEMPLUG_FD_<NAME> is set in its environment.

      memplug exec -r vm0 -- qemu-system-x86_64 ... mem-path={path:vm0}
    """  # fmt: skip
    env = dict(os.environ)
    subst: dict[str, str] = {}
    try:
        with client() as c:
            for spec in regions:
                match = REGION_SPEC.fullmatch(spec)
                if match is None:
                    raise InvalidArgument(f"--region {spec!r}: use NAME or NAME:ro")
                name, access = match.group(1), match.group(2) or "rw"
                if env_name(name) in env:
                    raise InvalidArgument(f"--region {name} is given twice")
                fd = c.attach(name, access, map_memory=False).detach_fd()
                os.set_inheritable(fd, True)
                env[env_name(name)] = str(fd)
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
    quota = (
        f"{format_size(st.plugged_bytes)} of {format_size(st.quota_bytes)} "
        f"({100 * st.plugged_bytes / st.quota_bytes:.0f}%)"
        if st.quota_bytes
        else f"{format_size(st.plugged_bytes)} (no quota)"
    )
    up = time.strftime("%H:%M:%S", time.gmtime(st.uptime_seconds))
    click.echo(f"memplugd {st.version}, up {up}, socket {st.socket}")
    click.echo(f"  regions:   {st.regions}")
    click.echo(f"  plugged:   {quota}")
    click.echo(f"  allocated: {format_size(st.allocated_bytes)}")
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
    for p in st.hugetlb_pools:
        click.echo(
            f"  hugetlb {format_size(p.page_size):>7}: {p.free} free of {p.total} "
            f"(reserved {p.reserved}, surplus {p.surplus})"
        )


# The VMM verbs (vm-update, hold, release) register themselves on the group.
from memplug.client import cli_vm  # noqa: E402, F401


def main() -> None:
    cli(prog_name="memplug")


if __name__ == "__main__":
    main()
