"""Smoke test of the benchmark's multirange section: it runs and reports every figure.

No assertion looks at how fast anything was (the benchmark judges speed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # bench/ is not installed: run it from here


@pytest.mark.slow
def test_quick_multirange_section(tmp_path: Path) -> None:
    raw = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--reps", "1", "--sections", "multirange",
            "--output", "-", "--json", str(raw),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads(raw.read_text())
    section = document["sections"]["multirange"]
    kinds = ["shmem", "hugetlb"] if len(section["targets"]) == 4 else ["shmem"]
    for kind in kinds:
        for op in ("plug", "unplug"):
            for way in ("one", "many", "raw"):
                result = section["results"][f"multirange.{kind}.{op}-{way}"]
                assert len(result["samples"]) == 1 and result["median"] > 0
    targets = section["targets"]
    assert len(targets) == 2 * len(kinds)
    assert all("one call >= 10x the throughput of 64 calls" in t["target"] for t in targets)
    assert all(t["passed"] in (True, False) for t in targets), targets
