"""QEMU live update on a memplug region (`memplug vm-update`) beside a plain migration to a file.

Per case (backing, size): a QEMU (-S, TCG) runs on the region through
`memplug exec`; `hand_over` (the code behind `memplug vm-update`) starts a
new QEMU on the same region and moves the VM with x-ignore-shared: the time
of `migrate` to completion on both sides, and the whole hand-over (hold, new
QEMU start, migration, old QEMU quit). Then the same VM, now in the new QEMU,
is migrated to a file without x-ignore-shared, as a save of its RAM does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.context import Bench
from bench.machine import HUGE_2M, qemu_binary
from bench.raw import Kind
from bench.report import GiB, MiB, Section, Table, fmt_size, fmt_time
from bench.stats import Result, median
from memplug.client import Client
from memplug.client.qmp import Qmp
from memplug.client.vmupdate import hand_over

MEMPLUG_MAIN = "from memplug.client.cli import main; main()"


def _argv(binary: str, size: int, qmp: Path) -> list[str]:
    mib = size // MiB
    return [
        binary, "-machine", "pc,memory-backend=m", "-m", f"{mib}M",
        "-object", f"memory-backend-file,id=m,size={mib}M,share=on,mem-path={{path:lu}}",
        "-nodefaults", "-nographic", "-display", "none", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def _save_to_file(qmp: Qmp, path: Path) -> float:
    """Plain migration of the VM's RAM and state to a file (no x-ignore-shared)."""
    qmp.execute(
        "migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": False}]
    )
    start = time.perf_counter()
    qmp.execute("migrate", uri=f"exec:cat > {path}")
    while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed"):
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    if status != "completed":
        raise RuntimeError(f"migration to a file {status}")
    return elapsed


def _one(b: Bench, c: Client, binary: str, kind: Kind, size: int) -> tuple[float, float, float]:
    """(hand-over migrate, hand-over total, save to file) seconds for one VM."""
    work = b.workdir / "liveupdate"
    work.mkdir(exist_ok=True)
    old_sock, new_sock = work / "old.qmp", work / "new.qmp"
    env = {**os.environ, "MEMPLUG_SOCKET": str(b.daemon().socket)}
    if kind == "hugetlb":
        c.create_region("lu", size, "hugetlb", page_size=HUGE_2M)
    else:
        c.create_region("lu", size)
    procs: list[int] = []
    try:
        c.plug("lu")
        old = subprocess.Popen(
            [sys.executable, "-c", MEMPLUG_MAIN, "exec", "-r", "lu", "--",
             *_argv(binary, size, old_sock)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(old.pid)
        Qmp.connect(str(old_sock), 30, wait=30).close()
        done = hand_over(
            c,
            regions=["lu"],
            old_qmp=str(old_sock),
            new_argv=_argv(binary, size, new_sock),
            socket=str(b.daemon().socket),
            new_log=str(work / "new.log"),
        )
        procs.append(done.new_pid)
        old.wait(timeout=30)
        with Qmp.connect(str(new_sock), 120) as new:
            saved = _save_to_file(new, work / "vm.state")
        return done.migrate_seconds, done.total_seconds, saved
    finally:
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for pid in procs:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                time.sleep(0.2)  # not our child (the new QEMU): give the kernel a moment
        (work / "vm.state").unlink(missing_ok=True)
        c.delete_region("lu")


def live_update_section(b: Bench) -> Section:
    s = Section("liveupdate", "QEMU live update on a region (vm-update) vs migration to a file")
    binary = qemu_binary()
    if binary is None:
        s.notes.append("qemu-system-x86_64 is not installed: nothing measured.")
        return s
    sizes = (128 * MiB,) if b.options.quick else (GiB, 4 * GiB)
    cases: list[tuple[Kind, int]] = [(k, n) for k in ("shmem", "hugetlb") for n in sizes]
    table = Table(
        ("VM RAM", "hand-over: migrate (device state)", "hand-over: total", "migrate to a file")
    )
    c = b.client()
    for kind, size in cases:
        why = b.can(kind)
        if why is not None:
            s.notes.append(f"{kind}: skipped ({why})")
            continue
        runs = [
            b.with_pages(kind, size, functools.partial(_one, b, c, binary, kind, size))()
            for _ in range(b.options.reps)
        ]
        b.log(f"liveupdate {kind} {fmt_size(size)}: {runs}")
        tag = f"{kind}.{size // MiB}M"
        migrate = Result(f"liveupdate.{tag}.migrate", [r[0] for r in runs])
        total = Result(f"liveupdate.{tag}.total", [r[1] for r in runs])
        saved = Result(f"liveupdate.{tag}.to-file", [r[2] for r in runs])
        s.results += [migrate, total, saved]
        table.add(
            f"{kind} {fmt_size(size)}",
            fmt_time(median(migrate.samples)),
            fmt_time(median(total.samples)),
            fmt_time(median(saved.samples)),
        )
    s.tables.append(table)
    s.notes.append(
        "Medians. The hand-over migrates with x-ignore-shared (RAM stays in the region); "
        "total adds the hold, the new QEMU's start through `memplug exec` and the old one's "
        "quit. The VM is paused (-S): no guest dirties memory."
    )
    return s
