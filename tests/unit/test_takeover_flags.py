"""--takeover's modes as parsed, and the argv a daemon re-executes itself with after a
taker died (every form of --takeover taken out, nothing else)."""

from __future__ import annotations

import pytest

from memplug.common.errors import MemplugError
from memplug.daemon.config import load
from memplug.daemon.startup import without_takeover


@pytest.mark.parametrize(
    ("argv", "mode"),
    [
        ([], "no"),
        (["--takeover"], "must"),
        (["--takeover=must"], "must"),
        (["--takeover=auto"], "auto"),
        (["--takeover", "auto"], "auto"),
        (["--takeover", "--state-dir", "/x"], "must"),
    ],
)
def test_takeover_modes(argv: list[str], mode: str) -> None:
    _, args = load(argv)
    assert args.takeover == mode


def test_an_unknown_takeover_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises((SystemExit, MemplugError)):
        load(["--takeover=maybe"])
    assert "auto" in capsys.readouterr().err


def test_after_handover() -> None:
    assert load([])[1].after_handover == "exit"
    assert load(["--after-handover", "wait"])[1].after_handover == "wait"


@pytest.mark.parametrize(
    ("argv", "left"),
    [
        (["-m", "memplug.daemon", "--state-dir", "/s", "--takeover"], ["--state-dir", "/s"]),
        (["-m", "memplug.daemon", "--takeover=auto", "--log-level", "debug"], None),
        (["/bin/memplugd", "--takeover", "auto", "--socket", "/s.sock"], None),
        (["/bin/memplugd", "--takeover", "--socket", "/s.sock"], None),
        (["/bin/memplugd", "--takeover=must"], None),
    ],
)
def test_without_takeover(argv: list[str], left: list[str] | None) -> None:
    kept = without_takeover(argv)
    assert not any(a.startswith("--takeover") or a in ("auto", "must") for a in kept)
    assert kept == [a for a in argv if not a.startswith("--takeover") and a not in ("auto",)]
    if left is not None:
        assert kept[2:] == left
