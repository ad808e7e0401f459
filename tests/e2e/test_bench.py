"""Smoke test of the benchmark: it runs, and writes tables with numbers in them.

Speed is judged by the benchmark itself (`make bench`, docs/bench.md), never
here: no assertion below looks at how fast anything was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from conftest import MiB, require, require_root

from bench import grpcecho
from memplug.v1 import memplug_pb2 as pb
from memplug.v1 import memplug_pb2_grpc as pb_grpc

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

    # The grpcio-alone floors: shown beside the others at both concurrencies, not judged
    # (the 15 targets above), and Plug's floor counted with the stream's shape in a note.
    for label in (
        "floor: grpcio alone, unary no-op (bench server, no memplug code)",
        "floor: grpcio alone, server stream of one message (Plug's shape)",
    ):
        got = [line for line in small.splitlines() if line.startswith(f"| {label} |")]
        assert len(got) == 2 and all(TIME.search(row) for row in got), small
    for clients in (1, 4):
        for step in ("grpcio-unary-no-op", "grpcio-one-message-stream"):
            assert results[f"small.{clients}.{step}"]["median"] > 0
    assert re.search(
        r"Plug's floor with the stream shape [^:]*: \d[\d.]* ms with 1 client "
        r"\(Plug 2 MiB p50 \d[\d.]* ms, [+-]\d[\d.]* ms\); \d[\d.]* ms with 4 clients",
        small,
    ), small


def test_grpcecho_serves_memplug_shapes_and_stops_cleanly(tmp_path: Path) -> None:
    """The grpcio-alone floor's server: GetRegion and a one-message Plug, then SIGTERM."""
    server = grpcecho.start(tmp_path / "grpcecho.sock")
    try:
        with grpc.insecure_channel(f"unix:{server.socket}") as channel:
            stub = pb_grpc.MemplugStub(channel)
            assert stub.GetRegion(pb.GetRegionRequest(name="r0"), timeout=10) == pb.Region()
            progress = list(stub.Plug(pb.PlugRequest(name="r0"), timeout=10))
            assert progress == [pb.Progress(done_bytes=1, total_bytes=1)]
            with pytest.raises(grpc.RpcError) as err:  # no memplug code behind the rest
                stub.GetStatus(pb.GetStatusRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        returncode = server.stop()
    assert returncode == 0
    assert not server.socket.exists()


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


@pytest.mark.slow
def test_quick_liveupdate_section_leaves_nothing_behind(tmp_path: Path) -> None:
    """The hand-over beside a migration to a file: every byte written out, no QEMU left."""
    require_root("hugetlb regions and the pool the section sizes")
    require(shutil.which("qemu-system-x86_64") is not None, "needs qemu-system-x86_64")
    raw = tmp_path / "bench.json"
    # The benchmark's work dir, named by every QEMU it starts; short, for the QMP sockets' paths.
    tmpdir = Path(tempfile.mkdtemp(prefix="mpb-"))
    try:
        proc = subprocess.run(
            [
                sys.executable, "-m", "bench", "--quick", "--reps", "1",
                "--sections", "liveupdate", "--output", "-", "--json", str(raw),
            ],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(tmpdir)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )  # fmt: skip
        leftovers = [
            entry.name
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _cmdline_mentions(entry, str(tmpdir).encode())
        ]
        assert leftovers == [], "QEMU or cat processes of the benchmark outlived it"
        assert list(tmpdir.iterdir()) == [], "the work dir was not removed"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    document = json.loads(raw.read_text())
    section = document["sections"]["liveupdate"]
    assert section["error"] is None
    # Both targets per backing got a verdict (the quick sizes stand in for 1 and 4 GiB).
    assert len(section["targets"]) == 4, section["targets"]
    results = section["results"]
    for kind in ("shmem", "hugetlb"):
        for mib in (128, 256):
            tag = f"liveupdate.{kind}.{mib}M"
            # The random fill leaves no zero page: the file holds all of guest RAM.
            assert results[f"{tag}.to-file.bytes"]["median"] >= mib * MiB * 0.99
            assert results[f"{tag}.to-file.switch"]["median"] > 0
            # The hand-over's new QEMU maps only what the guest touched.
            assert results[f"{tag}.handover.resident"]["median"] <= 4 * MiB
            assert results[f"{tag}.handover.switch"]["median"] > 0
            # One round after the discarded one: 3 hand-overs, then 1 migration to a file.
            assert results[f"{tag}.handover.command"]["n"] == 3
            assert results[f"{tag}.to-file.switch"]["n"] == 1


def _cmdline_mentions(proc_dir: Path, text: bytes) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_liveupdate_without_qemu_says_so() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sections", "liveupdate", "--output", "-"],
        cwd=ROOT,
        env={**os.environ, "PATH": "/nonexistent"},  # no qemu-system-x86_64 to find
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "**Not measured:** qemu-system-x86_64 is not on PATH" in proc.stdout, proc.stdout
