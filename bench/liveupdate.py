"""QEMU live update on a memplug region (`memplug vm-update`) beside a plain migration to a file.

One VM per case (backing, size), the VMs of one backing running at once:
guest RAM is a memplug region, plugged and then filled with random bytes
through this process's own mapping of it, so that no page is a zero page
(QEMU sends a zero page as a flag: it would flatter the plain migration). The
VMs run (TCG, no guest OS: SeaBIOS finds no boot device and waits), and move
from QEMU to QEMU in rounds (see _measure):

- hand-over: `memplug vm-update --json` run as a command. It starts the new
  QEMU (through `memplug exec`, `-incoming defer`), then migrates with
  x-ignore-shared: only the device state travels, RAM stays in the region.
- plain migration to a file: a new QEMU is started through `memplug exec` with
  `-incoming defer`; then the old QEMU migrates without x-ignore-shared to
  `exec:cat > FILE` (QEMU 7.2 has no `file:` URI), and the new one loads it
  with `migrate-incoming exec:cat FILE`.

The switch time is the same for both: from the `migrate` command on the old
QEMU (the VM is running until then; the migration stops it) until `cont` on
the new QEMU has returned (the VM runs again), the new QEMU being already
started. Its start (spawn of `memplug exec` until its QMP monitor answers) is
a fixed cost outside the switch, reported as a row of its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.context import Bench
from bench.machine import HUGE_2M, load_average, qemu_binary
from bench.raw import Kind
from bench.report import NA, GiB, MiB, Section, Table, Target, fmt_ratio, fmt_size, fmt_time
from bench.stats import Result, median
from memplug.client import Client
from memplug.client.qmp import Qmp, QmpError

MEMPLUG_MAIN = "from memplug.client.cli import main; main()"
FILL_CHUNK = 2 * MiB
MARK_AT = 0x4000000  # guest-physical 64 MiB: far from what SeaBIOS touches
XP_WORD = re.compile(r"0x([0-9a-f]{8})\b")
# QEMU 7.2 throttles a migration to 32 MiB/s unless told otherwise; an
# operator saving a VM to a file lifts the limit, and so do we.
UNLIMITED_BANDWIDTH = 1 << 40
POLL = 0.002
START_TIMEOUT = 120.0  # a QEMU start, a hand-over
SAVE_TIMEOUT = 600.0  # a plain migration of 4 GiB at a few hundred MB/s, with margin
HANDOVERS_PER_ROUND = 3  # cheap next to a plain migration: more samples where noise matters
SIZE_LIMIT = 1.2  # hand-over at 4 GiB ≤ 1.2x the 1 GiB one
SPEEDUP_NEED = 20.0  # hand-over ≥ 20x faster than the plain migration at 4 GiB


def _qemu_argv(binary: str, region: str, size: int, qmp: Path) -> list[str]:
    mib = size // MiB
    return [
        binary, "-machine", "pc,memory-backend=m", "-m", f"{mib}M",
        "-object", f"memory-backend-file,id=m,size={mib}M,share=on,mem-path={{path:{region}}}",
        "-nodefaults", "-nographic", "-display", "none", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


@dataclass
class Turn:
    """One switch of the VM from an old QEMU to a new one."""

    switch: float  # migrate on the old until cont returned on the new
    start: float  # the new QEMU's start (outside the switch)
    command: float = float("nan")  # the whole `memplug vm-update` (hand-over only)
    migrate: float = float("nan")  # vm-update's migrate on the old until both completed
    tool_total: float = float("nan")  # vm-update's own total (no Python start)
    moved: int = 0  # bytes the migration wrote (the state file's size; hand-over: 0)
    resident: int = 0  # guest RAM the new QEMU has mapped right after the switch
    old_resident: int = 0  # guest RAM the old QEMU had mapped before it


@dataclass
class Case:
    kind: Kind
    size: int
    handover: list[Turn] = field(default_factory=list)
    plain: list[Turn] = field(default_factory=list)
    fill_seconds: float = 0.0

    @property
    def region(self) -> str:
        return f"lu-{self.kind}-{self.size // MiB}m"


class Vms:
    """The QEMUs of one case: all of them are killed at exit, whoever started them.

    The hand-over's new QEMU is started by `memplug vm-update` in a session of
    its own and is not our child: every process whose command line names this
    case's work directory is ours to kill.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def qmp_path(self) -> Path:
        self.count += 1
        return self.work / f"q{self.count}.qmp"

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.work / f"q{self.count}.log").open("ab")
        with log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.children.append(proc)
        return proc

    def ours(self) -> list[int]:
        marker = str(self.work).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
        return pids

    def kill_all(self) -> None:
        for pid in self.ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.05)  # processes not our children: reaped by init


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU pid {pid} did not exit in {timeout:g} s")
        time.sleep(0.01)


def guest_ram_resident(pid: int, region: str) -> int:
    """Bytes of the region mapped into pid's page tables (4 KiB pages and huge pages)."""
    total, inside = 0, False
    name = f"/memfd:memplug:{region}"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = name in head
        elif inside and head and head[0] in ("Rss:", "Shared_Hugetlb:", "Private_Hugetlb:"):
            total += int(head[1]) * 1024
    return total


def _mark(c: Client, region: str, value: int) -> None:
    """Write value at MARK_AT through this process's mapping of the region."""
    with c.attach(region) as att:
        assert att.view is not None
        att.view[MARK_AT : MARK_AT + 4] = struct.pack("<I", value)


def _check_mark(qmp: Qmp, value: int) -> None:
    """The new QEMU reads value at MARK_AT: it runs the VM on the region."""
    out = qmp.hmp(f"xp /1xw {MARK_AT:#x}")
    words = [int(w, 16) for w in XP_WORD.findall(out.split(":", 1)[-1])]
    if words[:1] != [value]:
        raise RuntimeError(f"the new QEMU reads {out.strip()!r} at {MARK_AT:#x}, not {value:#x}")


def _fill(c: Client, region: str, size: int) -> float:
    """Random bytes in every page of the region; seconds it took."""
    chunk = os.urandom(FILL_CHUNK)
    start = time.perf_counter()
    with c.attach(region) as att:
        assert att.view is not None
        for offset in range(0, size, FILL_CHUNK):
            att.view[offset : offset + FILL_CHUNK] = chunk
    return time.perf_counter() - start


def _wait_status(qmp: Qmp, leave: str, deadline: float) -> None:
    while qmp.status() == leave:
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU {qmp.path} still {leave!r} at the deadline")
        time.sleep(POLL)


def _wait_migrated(qmp: Qmp, deadline: float) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"the migration {status}: {info.get('error-desc', '?')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the migration did not complete in time ({status})")
        time.sleep(POLL)


class Runner:
    def __init__(self, b: Bench, c: Client, binary: str, case: Case, vms: Vms) -> None:
        self.b, self.c, self.binary, self.case, self.vms = b, c, binary, case, vms
        self.env = {**os.environ, "MEMPLUG_SOCKET": str(b.daemon().socket)}
        self.exec_prefix = [sys.executable, "-c", MEMPLUG_MAIN, "exec", "-r", case.region, "--"]
        self.current_pid = 0
        self.current_qmp = Path()
        self.turns = 0

    def _qemu(self, qmp: Path) -> list[str]:
        return _qemu_argv(self.binary, self.case.region, self.case.size, qmp)

    def _start(self, *extra: str) -> tuple[subprocess.Popen[bytes], Path, float]:
        """A QEMU on the region through `memplug exec`; seconds until its monitor answered."""
        qmp = self.vms.qmp_path()
        argv = [*self.exec_prefix, *self._qemu(qmp), *extra]
        started = time.perf_counter()
        proc = self.vms.spawn(argv, self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                log = self.vms.work / f"q{self.vms.count}.log"
                tail = log.read_text(errors="replace").strip()[-500:]
                raise RuntimeError(f"QEMU exited with {proc.returncode}: {tail}")
            try:
                Qmp.connect(str(qmp), 30).close()
                return proc, qmp, time.perf_counter() - started
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not open {qmp} in time") from None
                time.sleep(0.005)

    def boot(self) -> None:
        """The first QEMU, running the VM."""
        proc, qmp, _ = self._start()
        with Qmp.connect(str(qmp), 30) as q:
            q.execute("cont")
        self.current_pid, self.current_qmp = proc.pid, qmp

    def _next_mark(self) -> int:
        self.turns += 1
        value = 0x5EED0000 + self.turns
        _mark(self.c, self.case.region, value)
        return value

    def hand_over(self) -> Turn:
        """`memplug vm-update` as a command: its JSON gives the switch and the start."""
        mark = self._next_mark()
        old_resident = guest_ram_resident(self.current_pid, self.case.region)
        qmp = self.vms.qmp_path()
        argv = [
            sys.executable, "-c", MEMPLUG_MAIN, "vm-update", "--json",
            "--qmp", str(self.current_qmp), "-r", self.case.region,
            "--new-log", str(self.vms.work / f"q{self.vms.count}.log"),
            "--timeout", str(START_TIMEOUT), "--",
            *self._qemu(qmp),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(
            argv,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 30,
            check=False,
        )
        command = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"memplug vm-update exited {done.returncode}: {done.stderr.strip()}")
        result = json.loads(done.stdout)
        if not result["was_running"]:
            raise RuntimeError("the VM was not running before the hand-over")
        new_pid = int(result["new_pid"])
        # Read before anything else runs in the new QEMU.
        resident = guest_ram_resident(new_pid, self.case.region)
        with Qmp.connect(str(qmp), 30) as q:
            if q.status() != "running":
                raise RuntimeError(f"the new QEMU's VM is {q.status()!r} after the hand-over")
            _check_mark(q, mark)
        _wait_exit(self.current_pid, 30)  # vm-update quit the old QEMU
        self.current_pid, self.current_qmp = new_pid, qmp
        return Turn(
            switch=float(result["downtime_seconds"]),
            start=float(result["start_seconds"]),
            command=command,
            migrate=float(result["migrate_seconds"]),
            tool_total=float(result["total_seconds"]),
            resident=resident,
            old_resident=old_resident,
        )

    def migrate_to_file(self) -> Turn:
        """The old QEMU saves the VM to a file, the new one (already started) loads it."""
        mark = self._next_mark()
        state = self.vms.work / f"{self.case.region}.state"
        proc, qmp, start = self._start("-incoming", "defer")
        try:
            with Qmp.connect(str(self.current_qmp), 30) as old, Qmp.connect(str(qmp), 30) as new:
                off = [{"capability": "x-ignore-shared", "state": False}]
                for q in (old, new):
                    q.execute("migrate-set-capabilities", capabilities=off)
                old.execute("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})
                deadline = time.monotonic() + SAVE_TIMEOUT
                t0 = time.perf_counter()
                old.execute("migrate", uri=f"exec:cat > {state}")
                _wait_migrated(old, deadline)
                new.execute("migrate-incoming", uri=f"exec:cat {state}")
                _wait_status(new, "inmigrate", deadline)
                new.execute("cont")
                switch = time.perf_counter() - t0
                resident = guest_ram_resident(proc.pid, self.case.region)
                if new.status() != "running":
                    raise RuntimeError(f"the loaded VM is {new.status()!r}")
                _check_mark(new, mark)
                moved = state.stat().st_size
                with contextlib.suppress(QmpError):
                    old.execute("quit")
            _wait_exit(self.current_pid, 30)
        finally:
            state.unlink(missing_ok=True)
        self.current_pid, self.current_qmp = proc.pid, qmp
        return Turn(switch=switch, start=start, moved=moved, resident=resident)


@contextlib.contextmanager
def _region(c: Client, case: Case) -> Iterator[None]:
    if case.kind == "hugetlb":
        c.create_region(case.region, case.size, "hugetlb", page_size=HUGE_2M)
    else:
        c.create_region(case.region, case.size)
    try:
        c.plug(case.region)
        yield
    finally:
        c.delete_region(case.region)


def _measure(b: Bench, c: Client, binary: str, kind: Kind, sizes: tuple[int, ...]) -> list[Case]:
    """One VM per size, all running at once; hand-overs and plain migrations in turns.

    A round is HANDOVERS_PER_ROUND hand-overs of every VM, then a migration
    to a file of every VM; the order of the sizes is reversed every round, so
    that no size always follows the heavy plain migration of the largest. The
    first round is discarded.
    """
    cases = [Case(kind, size) for size in sizes]
    work = b.workdir / f"liveupdate-{kind}"
    work.mkdir(exist_ok=True)
    vms = Vms(work)
    try:
        with contextlib.ExitStack() as regions:
            runs = []
            for case in cases:
                regions.enter_context(_region(c, case))
                case.fill_seconds = _fill(c, case.region, case.size)
                runs.append(Runner(b, c, binary, case, vms))
            for run in runs:
                run.boot()
            for i in range(1 + b.options.reps):
                order = runs if i % 2 == 0 else runs[::-1]
                handovers = [
                    (run, run.hand_over()) for _ in range(HANDOVERS_PER_ROUND) for run in order
                ]
                plains = [(run, run.migrate_to_file()) for run in order]
                for run, turn in handovers + plains:
                    b.log(
                        f"liveupdate {kind} {fmt_size(run.case.size)} #{i}: {turn}, "
                        f"load {load_average():.2f}"
                    )
                if i > 0:
                    for run, turn in handovers:
                        run.case.handover.append(turn)
                    for run, turn in plains:
                        run.case.plain.append(turn)
            vms.kill_all()  # before the regions go: no QEMU left mapping them
    finally:
        vms.kill_all()
        for leftover in work.glob("*.state"):
            leftover.unlink()
    return cases


def _med(turns: list[Turn], what: str) -> float:
    return median([float(getattr(t, what)) for t in turns])


def _results(case: Case) -> list[Result]:
    tag = f"liveupdate.{case.kind}.{case.size // MiB}M"
    meta = {"kind": case.kind, "size": case.size}
    out = [
        Result(f"{tag}.handover.switch", [t.switch for t in case.handover], meta=meta),
        Result(f"{tag}.handover.start", [t.start for t in case.handover], meta=meta),
        Result(f"{tag}.handover.command", [t.command for t in case.handover], meta=meta),
        Result(f"{tag}.handover.migrate", [t.migrate for t in case.handover], meta=meta),
        Result(f"{tag}.handover.tool-total", [t.tool_total for t in case.handover], meta=meta),
        Result(
            f"{tag}.handover.around-switch",
            [t.tool_total - t.start - t.switch for t in case.handover],
            meta={
                **meta,
                "what": "vm-update's total less the new QEMU's start and the switch: "
                "old QEMU's monitor, hold, capabilities, the old QEMU's quit",
            },
        ),
        Result(
            f"{tag}.handover.resident",
            [float(t.resident) for t in case.handover],
            unit="B",
            meta=meta,
        ),
        Result(
            f"{tag}.handover.old-resident",
            [float(t.old_resident) for t in case.handover],
            unit="B",
            meta=meta,
        ),
        Result(f"{tag}.to-file.switch", [t.switch for t in case.plain], meta=meta),
        Result(f"{tag}.to-file.start", [t.start for t in case.plain], meta=meta),
        Result(f"{tag}.to-file.bytes", [float(t.moved) for t in case.plain], unit="B", meta=meta),
    ]
    return out


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f} MiB"


def _targets(cases: list[Case]) -> list[Target]:
    """Per backing: the largest VM's hand-over against the smallest's, and against the file.

    The full run has 1 GiB and 4 GiB; --quick the same targets on its small sizes.
    """
    targets: list[Target] = []
    for kind in ("shmem", "hugetlb"):
        mine = sorted((c for c in cases if c.kind == kind), key=lambda c: c.size)
        if not mine:
            continue
        small, big = mine[0], mine[-1]
        at = fmt_size(big.size)
        if small is not big:
            a, z = _med(small.handover, "switch"), _med(big.handover, "switch")
            targets.append(
                Target(
                    f"{kind} hand-over at {at} ≤ {SIZE_LIMIT}x the {fmt_size(small.size)} one",
                    f"{fmt_ratio(z / a, 3)} ({fmt_time(z)} vs {fmt_time(a)})",
                    z <= SIZE_LIMIT * a,
                )
            )
        h, p = _med(big.handover, "switch"), _med(big.plain, "switch")
        targets.append(
            Target(
                f"{kind} {at} hand-over ≥ {SPEEDUP_NEED:g}x faster than a migration to a file",
                f"{fmt_ratio(p / h, 1)} ({fmt_time(h)} vs {fmt_time(p)})",
                p >= SPEEDUP_NEED * h,
            )
        )
    return targets


def live_update_section(b: Bench) -> Section:
    s = Section("liveupdate", "QEMU live update on a region (vm-update) vs migration to a file")
    binary = qemu_binary()
    if binary is None:
        missing = (
            "qemu-system-x86_64 is not on PATH: nothing measured (Debian: apt install "
            "qemu-system-x86)."
        )
        b.log(f"liveupdate: {missing}")
        # A section with no table is not rendered: the reader must still see why it is empty.
        s.markdown_extra = f"**Not measured:** {missing}"
        return s
    sizes = (128 * MiB, 256 * MiB) if b.options.quick else (GiB, 4 * GiB)
    c = b.client()
    cases: list[Case] = []
    loads: list[float] = []
    for kind in ("shmem", "hugetlb"):
        why = b.can(kind)
        if why is not None:
            s.notes.append(f"{kind}: skipped ({why})")
            continue
        loads.append(load_average())
        # _measure cleans up after itself: a retry (the pool taken meanwhile) starts afresh.
        measure = functools.partial(_measure, b, c, binary, kind, sizes)
        done = b.with_pages(kind, sum(sizes), measure)()
        cases += done
        for case in done:
            s.results += _results(case)
        loads.append(load_average())
    table = Table(
        (
            "VM RAM",
            "switch: hand-over",
            "switch: migration to a file",
            "hand-over faster by",
            "new QEMU start (hand-over / file)",
            "`memplug vm-update` command",
            "written to the file",
            "RAM mapped by the new QEMU (hand-over / file)",
        )
    )
    for case in cases:
        h, p = _med(case.handover, "switch"), _med(case.plain, "switch")
        table.add(
            f"{case.kind} {fmt_size(case.size)}",
            fmt_time(h),
            fmt_time(p),
            fmt_ratio(p / h, 1) if h > 0 else NA,
            f"{fmt_time(_med(case.handover, 'start'))} / {fmt_time(_med(case.plain, 'start'))}",
            fmt_time(_med(case.handover, "command")),
            _mib(_med(case.plain, "moved")),
            f"{_mib(_med(case.handover, 'resident'))} / {_mib(_med(case.plain, 'resident'))}",
        )
    s.tables.append(table)
    s.targets += _targets(cases)
    if loads:
        s.notes.append(
            f"Load average (1 min) during the section: {min(loads):.2f} to {max(loads):.2f}."
        )
    s.notes.append(
        "Switch: from the `migrate` command on the old QEMU (the VM runs until then) until "
        "`cont` has returned on the new QEMU (the VM runs again), the new QEMU already "
        "started. Hand-over: `memplug vm-update --json` (its `downtime_seconds`), "
        "x-ignore-shared, RAM stays in the region. Migration to a file: no x-ignore-shared, "
        "max-bandwidth lifted (QEMU 7.2 throttles to 32 MiB/s by default), `exec:cat > FILE` "
        "on the work dir's filesystem (page cache, no fsync), then `migrate-incoming exec:cat "
        "FILE` on the new QEMU, which maps the same region (loading into memory already "
        "allocated: no allocation cost, which favours the plain migration)."
    )
    s.notes.append(
        "Guest RAM is filled with random bytes through the region before the first turn, so "
        "every page is copied by the plain migration (`written to the file`). One VM per size "
        "runs at once (TCG, SeaBIOS, no OS) and moves from QEMU to QEMU: a round is "
        f"{HANDOVERS_PER_ROUND} hand-overs of each VM, then a migration to a file of each, the "
        f"order of the sizes reversed every round; {b.options.reps} rounds after a discarded "
        "one. The first hand-over of a round starts from a QEMU that loaded the file (every "
        "page of guest RAM mapped, as after a guest that used all its RAM). Each new QEMU "
        "reads back a value written into guest RAM just before its turn."
    )
    s.notes.append(
        "New QEMU start: spawning `memplug exec` until the QMP monitor answers, outside the "
        "switch. The `memplug vm-update` command: its wall time, Python start, hold, new "
        "QEMU start, switch, old QEMU's quit and release. RAM mapped by the new QEMU: its "
        "page tables over the region right after the switch (smaps Rss + hugetlb): the "
        "hand-over maps only what the running guest touches; nothing is preallocated."
    )
    return s
