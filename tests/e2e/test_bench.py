"""Smoke test of the benchmark: it runs, and writes tables with numbers in them.

Speed is judged by the benchmark itself (`make bench`, docs/bench.md), never
here: no assertion below looks at how fast anything was.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # bench/ is not installed: run it from here
TIME = re.compile(r"\| \d[\d,.]* (ms|s) \|")


@pytest.mark.slow
def test_quick_small_and_rss_sections(tmp_path: Path) -> None:
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--sections", "small,rss",
            "--output", str(out), "--json", str(raw),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    markdown = out.read_text()
    assert markdown in proc.stdout  # printed and saved alike
    assert markdown.startswith("# memplug benchmark")
    assert "QUICK RUN" in markdown
    for heading in ("## Targets", "## Small operations", "## Daemon footprint"):
        assert heading in markdown
    for header_fact in ("| kernel |", "| CPU |", "| NUMA |", "| THP shmem_enabled |"):
        assert header_fact in markdown

    # Every target of the two sections got a verdict from a measured figure.
    targets = [line for line in markdown.splitlines() if "**PASS**" in line or "**FAIL**" in line]
    # small: 5 operations judged at 1 and at 4 clients, 2 attaches ≤ 2 ms; rss: 3
    assert len(targets) == 15, markdown
    # The tables carry numbers: latencies, ops/s and sizes.
    small = markdown.split("## Small operations", 1)[1].split("## Daemon footprint", 1)[0]
    rows = [
        line for line in small.splitlines() if line.startswith("| floor") or "GetRegion" in line
    ]
    assert rows and all(TIME.search(row) for row in rows), small
    assert re.search(r"\| VmRSS idle [^|]*\| \d+\.\d MiB \|", markdown)

    document = json.loads(raw.read_text())
    results = {
        key: r for section in document["sections"].values() for key, r in section["results"].items()
    }
    assert results["rss.idle"]["median"] > 0
    assert len(results["rss.exec-to-serving"]["samples"]) == document["options"]["reps"]
    latencies = results["small.1.gRPC-health-Check"]
    assert latencies["n"] > 0 and latencies["median"] > 0


def test_unknown_section_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--sections", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "unknown sections" in proc.stderr
