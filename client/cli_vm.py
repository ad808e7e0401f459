"""memplug verbs for VMMs: vm-update (QEMU live update on a region), hold and release.

Registered on the memplug group by cli.py; kept apart so the VMM tooling
grows without touching the region verbs.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import click

from memplug.client.cli import _emit, cli, client, command, fail, one_line
from memplug.client.errors import MemplugError
from memplug.client.vmupdate import HandOverFailed, hand_over


@command(cli, "hold")
@click.argument("name")
@click.option("--holder", required=True, help="who holds it (named in the refusals)")
@click.option("--reason", default="", help="why, for people")
@click.option("--ttl", type=click.FloatRange(0, 86400, min_open=True), default=300.0)
def hold_cmd(name: str, holder: str, reason: str, ttl: float) -> None:
    """Refuse unplug, discard and rm of NAME until released or TTL seconds pass."""
    with client() as c:
        hold = c.hold_region(name, holder, reason, ttl)
    _emit(
        click.get_current_context(),
        dataclasses.asdict(hold),
        lambda: click.echo(
            f"{name} held by {hold.holder!r} for {hold.expires_at - time.time():.0f} s"
        ),
    )


@command(cli, "release")
@click.argument("name")
@click.option("--holder", required=True, help="the holder named by hold or in the refusal")
def release_cmd(name: str, holder: str) -> None:
    """Drop HOLDER's hold on NAME (not an error if it held none)."""
    with client() as c:
        released = c.release_region(name, holder)
    _emit(
        click.get_current_context(),
        {"released": released},
        lambda: click.echo(f"{name}: {'released' if released else f'no hold by {holder!r}'}"),
    )


@cli.command("vm-update", context_settings={"ignore_unknown_options": True})
@click.option("--qmp", "old_qmp", required=True, help="the running QEMU's QMP unix socket")
@click.option(
    "--region", "-r", "regions", multiple=True, required=True, help="guest RAM region (repeatable)"
)
@click.option("--new-qmp", default=None, help="QMP socket for the tool in the new QEMU")
@click.option("--new-log", default=None, help="file for the new QEMU's stdout and stderr")
@click.option("--hold-ttl", type=click.FloatRange(0, 86400, min_open=True), default=300.0)
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0)
@click.option("--json", "json_out", is_flag=True, help="machine-readable output")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_update_cmd(
    old_qmp: str,
    regions: tuple[str, ...],
    new_qmp: str | None,
    new_log: str | None,
    hold_ttl: float,
    timeout: float,
    json_out: bool,
    command: tuple[str, ...],
) -> None:
    """Hand the VM behind --qmp to a new QEMU (COMMAND) on the same regions.

    COMMAND is the new QEMU's command line, as for `memplug exec` ({path:NAME});
    the tool adds `-incoming defer` and its own QMP socket. RAM is not copied
    (x-ignore-shared): both QEMUs map the region. On failure the new QEMU is
    killed and the old one keeps the VM.

      memplug vm-update --qmp /run/vm0.qmp -r vm0 -- qemu-system-x86_64 ...
    """  # fmt: skip
    ctx = click.get_current_context()
    ctx.obj["json"] = ctx.obj["json"] or json_out
    verbose = not ctx.obj["json"]

    def say(line: str) -> None:
        if verbose:
            click.echo(f"vm-update: {line}", err=True)

    try:
        with client() as c:
            result = hand_over(
                c,
                regions=regions,
                old_qmp=old_qmp,
                new_argv=list(command),
                socket=ctx.obj["socket"],
                new_qmp=new_qmp,
                new_log=new_log,
                hold_ttl=hold_ttl,
                timeout=timeout,
                say=say,
            )
    except MemplugError as exc:
        fail(exc)
    except HandOverFailed as exc:
        click.echo(f"memplug: vm-update: {one_line(str(exc))}", err=True)
        sys.exit(1)
    _emit(
        ctx,
        dataclasses.asdict(result),
        lambda: click.echo(
            f"vm-update: new QEMU pid {result.new_pid} runs the VM "
            f"(downtime {result.downtime_seconds * 1e3:.1f} ms, "
            f"total {result.total_seconds * 1e3:.0f} ms; output in {result.new_log})"
        ),
    )
