"""HoldRegion / ReleaseRegion: a held region cannot be unplugged, discarded or deleted.

The hold is recorded in the state store: a daemon restarted in the middle of a
hand-over (a file region here, which comes back without systemd's fd store)
still refuses, naming the holder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, MiB, start_daemon

from memplug.client import Client, FailedPrecondition, InvalidArgument, NotFound

HOLDER = "memplug vm-update pid 4242"


def test_a_held_region_refuses_unplug_discard_and_delete(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        c.create_region("vm0", 16 * MiB)
        c.plug("vm0")
        hold = c.hold_region("vm0", HOLDER, "live update of QEMU pid 41", ttl=60)
        assert hold.holder == HOLDER and 55 < hold.expires_at - time.time() <= 60
        refusals: dict[str, Callable[[], object]] = {
            "unplug": lambda: c.unplug("vm0", 0, 2 * MiB),
            "discard": lambda: c.discard("vm0", 0, 2 * MiB),
            "delete": lambda: c.delete_region("vm0"),
        }
        for verb, call in refusals.items():
            with pytest.raises(FailedPrecondition) as info:
                call()
            message = str(info.value)
            assert f"cannot {verb} region 'vm0'" in message, message
            assert HOLDER in message and "live update of QEMU pid 41" in message, message
            assert f"memplug release vm0 --holder '{HOLDER}'" in message, message
        # Nothing was changed by the refusals; plug and populate still work.
        assert c.get_region("vm0").plugged_bytes == 16 * MiB
        c.populate("vm0")
        assert c.release_region("vm0", "someone else") is False
        assert c.release_region("vm0", HOLDER) is True
        assert c.release_region("vm0", HOLDER) is False
        assert c.unplug("vm0", 0, 2 * MiB).bytes == 2 * MiB
        c.delete_region("vm0")


def test_a_hold_expires_and_bad_holds_are_refused(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        c.create_region("vm0", 16 * MiB)
        c.plug("vm0")
        for holder, reason, ttl, why in (
            ("", "", 10.0, "holder is empty"),
            ("x" * 129, "", 10.0, "at most 128"),
            ("h\nx", "", 10.0, "unprintable"),
            ("h", "r" * 257, 10.0, "at most 256"),
            ("h", "", 0.0, "ttl_seconds 0.0 is out of range"),
            ("h", "", 86401.0, "out of range"),
            ("h", "", float("nan"), "out of range"),
        ):
            with pytest.raises(InvalidArgument, match=why):
                c.hold_region("vm0", holder, reason, ttl)
        with pytest.raises(NotFound):
            c.hold_region("nope", HOLDER, "", 10)
        with pytest.raises(NotFound):
            c.release_region("nope", HOLDER)
        c.hold_region("vm0", HOLDER, "", ttl=0.3)
        with pytest.raises(FailedPrecondition):
            c.unplug("vm0", 0, 2 * MiB)
        time.sleep(0.5)
        assert c.unplug("vm0", 0, 2 * MiB).bytes == 2 * MiB
        c.delete_region("vm0")
    assert "Traceback" not in daemon.log()


def test_a_hold_survives_a_restart_of_the_daemon(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    first = start_daemon(tmp_path / "d", "--allow-dir", str(files))
    try:
        with Client(first.socket) as c:
            c.create_region("vm0", 16 * MiB, "file", path="vm0.img")
            c.plug("vm0")
            c.hold_region("vm0", HOLDER, "hand-over", ttl=120)
    finally:
        assert first.stop() == 0, first.log()
    second = start_daemon(tmp_path / "d", "--allow-dir", str(files))
    try:
        with Client(second.socket) as c:
            with pytest.raises(FailedPrecondition, match=f"held by '{HOLDER}' \\(hand-over\\)"):
                c.unplug("vm0", 0, 2 * MiB)
            with pytest.raises(FailedPrecondition, match="cannot delete"):
                c.delete_region("vm0")
            assert c.release_region("vm0", HOLDER) is True
            c.delete_region("vm0")
    finally:
        assert second.stop() == 0, second.log()
    assert "Traceback" not in second.log()
