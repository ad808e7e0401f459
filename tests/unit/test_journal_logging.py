"""Logging under journald: one "<N>"-prefixed line per event; unchanged elsewhere.

The daemon's own logging set-up runs in a real child process whose stderr is a
real file, with $JOURNAL_STREAM naming that file's device:inode as systemd
names the stream it connects (or naming another file, as a child inherits it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EMIT = """
import logging, sys
from memplug.daemon.__main__ import setup_logging
setup_logging("debug", sys.argv[1])
log = logging.getLogger("memplug.test")
log.debug("debug line")
log.info("info line")
log.warning("warning line")
log.error("health check: the gRPC socket does not answer: <_InactiveRpcError\\n\\tstatus = x\\n>")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("internal error")
"""


def run_emit(tmp_path: Path, fmt: str, *, journal: bool) -> list[str]:
    out = tmp_path / "stderr"
    with out.open("wb") as stderr:
        target = os.fstat(stderr.fileno()) if journal else os.stat(tmp_path)
        env = {**os.environ, "JOURNAL_STREAM": f"{target.st_dev}:{target.st_ino}"}
        subprocess.run(
            [sys.executable, "-c", EMIT, fmt], stderr=stderr, env=env, check=True, timeout=60
        )
    return out.read_text().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_journal_lines_carry_their_priority(tmp_path: Path, fmt: str) -> None:
    lines = run_emit(tmp_path, fmt, journal=True)
    assert len(lines) == 5, lines  # one line per event, the traceback folded in
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>"], lines
    assert "warning line" in lines[2]
    assert "status = x" in lines[3]
    assert "internal error" in lines[4]
    assert "Traceback" in lines[4]
    assert "ValueError: boom" in lines[4]


def test_text_outside_journald_is_unchanged(tmp_path: Path) -> None:
    """$JOURNAL_STREAM naming something else than stderr: timestamps, no prefix."""
    lines = run_emit(tmp_path, "text", journal=False)
    assert not any(line.startswith("<") for line in lines), lines
    assert lines[0][:4].isdigit(), lines  # "2026-01-05 10:00:00,123 level=DEBUG ..."
    assert any(line.startswith("Traceback") for line in lines), lines
