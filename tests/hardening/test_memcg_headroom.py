"""memcg.headroom against real memory cgroups: the limit found, and a move seen at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from hardening_kit import memory_cgroup, own_memory_cgroup

from memplug.common.sizes import MiB

LIMIT = 256 * MiB

# Runs in a child process: headroom before and after moving itself into the
# test's cgroup, then after moving back. The first call opens /proc/PID/cgroup,
# so the later answers prove the kept fd is read afresh.
CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from memplug.daemon.kernel import memcg

    procs = Path(sys.argv[1]) / "cgroup.procs"
    home = Path(sys.argv[2]) / "cgroup.procs"

    def room():
        found = memcg.headroom()
        return None if found is None else [found.cgroup, found.limit, found.bytes]

    before = room()
    procs.write_text(str(__import__("os").getpid()))
    inside = room()
    home.write_text(str(__import__("os").getpid()))
    print(json.dumps({"before": before, "inside": inside, "after": room()}))
    """
)


def test_headroom_finds_the_limit_and_follows_a_move() -> None:
    with memory_cgroup(LIMIT) as cg:
        home = own_memory_cgroup(cg.path.parent, cg.version)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(cg.path), str(home)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        got = json.loads(out.stdout)
    cgroup, limit, room = got["inside"]
    assert cgroup == str(cg.path)
    assert limit == LIMIT
    assert 0 < room <= LIMIT
    for outside in (got["before"], got["after"]):
        assert outside is None or outside[0] != str(cg.path), got
