#!/usr/bin/env python3
"""Run the hardening tests and write the reliability report (`make reliability`).

1. Runs pytest on tests/hardening with MEMPLUG_FIGURES set: the tests append
   their figures (faults injected, bytes checked by sha256, leaks measured,
   operations run, fuzz examples, attacks tried) to a JSON-lines file, and
   pytest's JUnit XML gives the outcome of every test.
2. Aggregates both into build/reliability/reliability.json.
3. Renders docs/reliability.md from that JSON: the date, the kernel, the
   machine, a table of figures, and pass/fail per fault and per attack.

Every number in the report is computed from what the tests recorded; none is
typed in. The exit status is pytest's, so a failing test fails `make reliability`
(the report is written either way, failures included).

    python -m bench.reliability [--out DIR] [--doc FILE] [--render-only] [--soak SECONDS]
                                [-- PYTEST_ARGS...]

--soak SECONDS runs only test_load's 16-client random load, for SECONDS, while the
daemon's fds, threads and RSS are sampled every few seconds; the report says
whether each stayed flat (bench/reliability_figures.py defines flat). Neither the
default run nor `make test` soaks.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.reliability_figures import (
    USAGE_HEADER,
    WINDOW_SECONDS,
    suite_rows,
    usage_rows,
    usage_summary,
)

ROOT = Path(__file__).resolve().parent.parent
TESTS = "tests/hardening"
SUITES = {
    "test_fault_matrix": "Fault matrix",
    "test_load": "Load",
    "test_fuzz": "Fuzzing",
    "test_attacks": "Attacks",
    "test_fd_socket_abuse": "Fd socket abuse",
    "test_state_and_metrics": "State dir and metrics port",
    "test_request_cost": "Refused-request cost",
    "test_holders": "Holders",
    "test_charge_cgroup": "Charge cgroups",
}
# The suites whose figures get a table of their own (module, what it shows).
FIGURE_SUITES = {
    "test_fd_socket_abuse": "One uid floods the fd socket (uid 65534): what the daemon and "
    "other uids see.",
    "test_state_and_metrics": "Idle connections held on the metrics port; a full state dir.",
    "test_request_cost": "Plugs of huge sparse regions refused by the quota, with extreme "
    "thread counts: what refusing costs the daemon.",
    "test_holders": "Holders of region fds: sparse attach, FILE regions, memory allocated by "
    "holders.",
    "test_charge_cgroup": "Plugged memory charged to a consumer's memory cgroup.",
}
SOAK_SAMPLE_SECONDS = 5


# --------------------------------------------------------------------------- running


def run_tests(out: Path, pytest_args: list[str], soak: float = 0) -> tuple[int, float]:
    out.mkdir(parents=True, exist_ok=True)
    figures, junit = out / "figures.jsonl", out / "junit.xml"
    figures.unlink(missing_ok=True)
    junit.unlink(missing_ok=True)
    env = {**os.environ, "MEMPLUG_FIGURES": str(figures)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS]
    if soak:
        env["MEMPLUG_LOAD_SECONDS"] = str(soak)
        env["MEMPLUG_SAMPLE_SECONDS"] = str(SOAK_SAMPLE_SECONDS)
        # The load runs for `soak` seconds; the default per-test timeout would cut it short.
        argv += [f"--timeout={int(soak) + 600}"]
        if not pytest_args:
            pytest_args = ["-k", "test_sixteen_clients_at_random"]
    argv += [f"--junitxml={junit}", "-o", "junit_family=xunit1", *pytest_args]
    print("+", " ".join(argv), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(argv, cwd=ROOT, env=env)
    return rc, time.monotonic() - t0


# --------------------------------------------------------------------------- reading


def read_junit(path: Path) -> list[dict[str, Any]]:
    """Each test: node id, outcome (passed, failed, skipped), seconds, message."""
    if not path.exists():
        return []
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        nodeid = f"{module}.py::{case.get('name', '?')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = child.get("message", "") or (child.text or "")
            elif child.tag == "skipped":
                outcome = "skipped"
                message = child.get("message", "")
        if outcome == "failed" and case.find("failure") is None:
            outcome = "error"
        tests.append(
            {
                "test": nodeid,
                "outcome": outcome,
                "seconds": float(case.get("time", "0") or 0),
                "message": " ".join(message.split())[:300],
            }
        )
    return tests


def read_figures(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def suite_of(test: str) -> str:
    module = test.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return SUITES.get(module, module)


def total(figures: Iterable[dict[str, Any]], name: str, **labels: str) -> float:
    return sum(
        float(f["value"])
        for f in figures
        if f["name"] == name and all(f["labels"].get(k) == v for k, v in labels.items())
    )


def by_label(figures: list[dict[str, Any]], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for f in figures:
        if f["name"] == name:
            out[str(f["labels"].get(label, "?"))] += f["value"]
    return dict(sorted(out.items()))


def aggregate(figures: list[dict[str, Any]], tests: list[dict[str, Any]]) -> dict[str, Any]:
    outcome = {t["test"]: t for t in tests}

    def result(test: str) -> str:
        return str(outcome.get(test, {}).get("outcome", "not run"))

    faults = []
    for f in figures:
        if f["name"] == "fault":
            faults.append(
                {"fault": f["labels"]["fault"], "test": f["test"], "result": result(f["test"])}
            )
    leaks = [f for f in figures if f["name"] == "leak"]
    measured = [
        {"what": f["labels"]["what"], "unit": f["labels"].get("unit", "bytes"),
         "value": f["value"], "tolerance": float(f["labels"].get("tolerance", 0)),
         "test": f["test"]}
        for f in leaks if f["value"]
    ]  # fmt: skip
    found = [x for x in measured if x["value"] < 0 or x["value"] > x["tolerance"]]
    tolerated = [x for x in measured if x not in found]
    attacks: dict[str, dict[str, Any]] = {}
    for f in figures:
        if f["name"] == "attack":
            a = attacks.setdefault(
                f["labels"]["attack"], {"tried": 0, "blocked": 0, "tests": set(), "by_daemon": {}}
            )
            blocked = f["value"] if f["labels"]["outcome"] == "blocked" else 0
            a["tried"] += f["value"]
            a["blocked"] += blocked
            a["tests"].add(f["test"])
            # Which daemon was attacked: as root, or as the packaged non-root user.
            per = a["by_daemon"].setdefault(f["labels"].get("daemon", "root"), [0, 0])
            per[0] += f["value"]
            per[1] += blocked
    load_ops = [f for f in figures if f["name"] == "load_ops"]
    load_by_outcome: dict[str, float] = collections.defaultdict(float)
    load_by_op: dict[str, float] = collections.defaultdict(float)
    for f in load_ops:
        load_by_outcome[f["labels"]["outcome"]] += f["value"]
        load_by_op[f["labels"]["op"]] += f["value"]
    counts = collections.Counter(t["outcome"] for t in tests)
    return {
        "tests": {
            "total": len(tests),
            "passed": counts["passed"],
            "failed": counts["failed"] + counts["error"],
            "skipped": counts["skipped"],
            "per_suite": {
                suite: dict(
                    collections.Counter(t["outcome"] for t in tests if suite_of(t["test"]) == suite)
                )
                for suite in sorted({suite_of(t["test"]) for t in tests})
            },
        },
        "faults": faults,
        "faults_injected": len(faults),
        "bytes_checked": total(figures, "bytes_checked"),
        "leak_checks": len(leaks),
        "leaks_found": found,
        "growth_within_tolerance": tolerated,
        "load": {
            "ops": sum(load_by_outcome.values()),
            "seconds": total(figures, "load_seconds"),
            "clients": total(figures, "load_clients"),
            "by_outcome": dict(sorted(load_by_outcome.items())),
            "by_op": dict(sorted(load_by_op.items())),
            "regions_checked": total(figures, "load_regions_checked"),
            "fds": by_label(figures, "load_fds", "phase"),
            "rss": by_label(figures, "load_rss", "phase"),
        },
        "fuzz": {
            "examples": total(figures, "fuzz_examples"),
            "by_target": by_label(figures, "fuzz_examples", "target"),
            "codes": by_label(figures, "fuzz_codes", "code"),
            "fd_socket_garbage": total(figures, "fd_socket_garbage"),
            "fd_socket_near_misses": total(figures, "fd_socket_near_miss"),
            "fd_socket_idle_connections": total(figures, "fd_socket_idle_connections"),
            "attaches_during_slow_loris": total(figures, "fd_socket_slow_loris_served_meanwhile"),
        },
        "attacks": [
            {
                "attack": k,
                "tried": v["tried"],
                "blocked": v["blocked"],
                "result": "blocked" if v["tried"] == v["blocked"] else "GOT THROUGH",
                "tests": sorted(v["tests"]),
                "by_daemon": v["by_daemon"],
            }
            for k, v in sorted(attacks.items())
        ],
        "ticket_guesses": total(figures, "ticket_guesses"),
        "symlink_race": {
            "attempts": by_label(figures, "symlink_race_attempts", "target"),
            "flips": by_label(figures, "symlink_race_flips", "target"),
            "outcomes": by_label(figures, "symlink_race_outcomes", "code"),
        },
        "memcg_oom_kills": total(figures, "memcg_oom_kills"),
        "suite_figures": {module: suite_rows(figures, module) for module in FIGURE_SUITES},
        "usage": usage_summary(figures),
        "failures": [t for t in tests if t["outcome"] in ("failed", "error")],
        "skips": [t for t in tests if t["outcome"] == "skipped"],
    }


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1]
        except OSError:
            pass
        return "?"

    mem_kib = first("/proc/meminfo", "MemTotal").split()[0]
    sizes = sorted(
        int(m.group(1)) * 1024
        for e in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB")
        if (m := re.fullmatch(r"hugepages-(\d+)kB", e.name))
    )
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if controllers.exists() and "memory" in controllers.read_text().split():
        cgroup = "v2"
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        cgroup = "v1"
    else:
        cgroup = "none"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "arch": platform.machine(),
        "cpu": first("/proc/cpuinfo", "model name"),
        "cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem_kib) / (1 << 20), 1) if mem_kib.isdigit() else "?",
        "os": first("/etc/os-release", "PRETTY_NAME").strip('"'),
        "python": platform.python_version(),
        "huge_page_sizes": [f"{s >> 20} MiB" if s < 1 << 30 else f"{s >> 30} GiB" for s in sizes],
        "memory_cgroup": cgroup,
        "commit": commit,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- rendering


def size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def num(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def table(header: list[str], rows: Iterable[Iterable[object]]) -> list[str]:
    body = ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    if not body:
        return ["(nothing recorded: not run)", ""]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *body, ""]


def render(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["aggregate"]
    t, load, fuzz = a["tests"], a["load"], a["fuzz"]
    verdict = "all passed" if t["failed"] == 0 else f"{t['failed']} FAILED"
    out = [
        "# Reliability report",
        "",
        "Generated by `make reliability` ([bench/reliability.py](../bench/reliability.py))",
        "from what the hardening tests ([tests/hardening](../tests/hardening)) recorded while",
        "they ran: every figure below is computed, none is typed in. Do not edit by hand.",
        "",
        f"- **Date:** {report['date']}",
        f"- **Kernel:** Linux {m['kernel']} ({m['kernel_version']}, {m['arch']})",
        f"- **Machine:** {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['os']}",
        f"- **Huge page pools offered:** {', '.join(m['huge_page_sizes']) or 'none'}; "
        f"memory cgroup {m['memory_cgroup']}",
        f"- **Python:** {m['python']}; **memplug:** {m['commit']}",
        *load_line(m),
        f"- **Result:** {t['total']} tests, {t['passed']} passed, {t['failed']} failed, "
        f"{t['skipped']} skipped in {report['seconds']:.0f} s: **{verdict}**",
        "",
        "## Figures",
        "",
    ]
    leaks = a["leaks_found"]
    oks = load["by_outcome"].get("OK", 0)
    fds, rss, race = load["fds"], load["rss"], a["symlink_race"]
    tried = sum(x["tried"] for x in a["attacks"])
    blocked = sum(x["blocked"] for x in a["attacks"])
    leaked = ", ".join(x["what"] for x in leaks)
    rows = [
        ["faults injected", num(a["faults_injected"])],
        ["bytes checked by sha256 after faults",
         f"{num(a['bytes_checked'])} ({size(a['bytes_checked'])})"],
        ["leak checks (pools, tmpfs, allocation, quota, fds, RSS)", num(a["leak_checks"])],
        ["leaks found", f"{len(leaks)} ({leaked})" if leaks else "0"],
        ["load: operations run",
         f"{num(load['ops'])} by {num(load['clients'])} clients in {num(load['seconds'])} s"],
        ["load: succeeded / refused with a documented code",
         f"{num(oks)} / {num(load['ops'] - oks)}"],
        ["load: daemon fds, baseline → after",
         f"{num(fds.get('baseline', 0))} → {num(fds.get('after', 0))}"],
        ["load: daemon RSS, baseline → after",
         f"{size(rss.get('baseline', 0))} → {size(rss.get('after', 0))}"],
        ["fuzz: gRPC requests", num(fuzz["examples"])],
        ["fuzz: fd socket garbage / near-miss tickets",
         f"{num(fuzz['fd_socket_garbage'])} / {num(fuzz['fd_socket_near_misses'])}"],
        ["fuzz: idle fd socket connections held at once",
         num(fuzz["fd_socket_idle_connections"])],
        ["attacks tried / blocked", f"{num(tried)} / {num(blocked)}"],
        ["guessed tickets", num(a["ticket_guesses"])],
        ["symlink swap race: region creations / flips",
         f"{num(sum(race['attempts'].values()))} / {num(sum(race['flips'].values()))}"],
        ["memory cgroup OOM kills (all of them the helper)", num(a["memcg_oom_kills"])],
    ]  # fmt: skip
    out += table(["figure", "value"], rows)
    out += ["## Tests by suite", ""]
    out += table(
        ["suite", "passed", "failed", "skipped"],
        [
            [s, c.get("passed", 0), c.get("failed", 0) + c.get("error", 0), c.get("skipped", 0)]
            for s, c in t["per_suite"].items()
        ],
    )
    out += ["## Faults", "", "Each injected through a real daemon against real kernel limits.", ""]
    out += table(
        ["fault", "result", "test"],
        [[f["fault"], mark(f["result"]), f"`{f['test'].split('::', 1)[1]}`"] for f in a["faults"]],
    )
    out += ["## Load: outcomes", ""]
    out += table(["outcome", "operations"], [[k, num(v)] for k, v in load["by_outcome"].items()])
    out += table(["operation", "count"], [[k, num(v)] for k, v in load["by_op"].items()])
    usage = a.get("usage", {})
    if usage:
        out += [
            "## Daemon usage under load" + (" (soak)" if report.get("soak") else ""),
            "",
            "The daemon's fds, threads and RSS sampled every few seconds while the load ran.",
            "**Flat** means: the last window's maximum is within max(5 %, 2 threads) (fds:",
            "max(10 %, 8): each live region holds one)",
            f"of the first window's (windows of {WINDOW_SECONDS:.0f} s, or a quarter of the",
            "run when it is shorter), and the per-window maxima do not rise window after",
            "window (monotonic growth).",
            "",
        ]
        out += table(USAGE_HEADER, usage_rows(usage))
    out += ["## Fuzzing", ""]
    out += table(["target", "examples"], [[k, num(v)] for k, v in fuzz["by_target"].items()])
    out += table(["status code", "answers"], [[k, num(v)] for k, v in fuzz["codes"].items()])
    out += [
        "## Attacks",
        "",
        "Each by a real process running as uid/gid 65534, against memplugd as root and",
        "against memplugd as packaging/systemd/memplugd.service runs it (a system uid with",
        "only the unit's capabilities; here RLIMIT_NOFILE 1024): tried / blocked.",
        "",
    ]

    def against(x: dict[str, Any], daemon: str) -> str:
        tried, blocked = x.get("by_daemon", {}).get(daemon, (0, 0))
        return f"{num(tried)} / {num(blocked)}" if tried else "-"

    out += table(
        ["attack", "daemon as root", "daemon as the memplug user", "result"],
        [
            [x["attack"], against(x, "root"), against(x, "packaged"), mark(x["result"])]
            for x in a["attacks"]
        ],
    )
    race = a["symlink_race"]
    if race["attempts"]:
        out += ["Symlink swap race, region creations by outcome:", ""]
        out += table(["outcome", "creations"], [[k, num(v)] for k, v in race["outcomes"].items()])
    for module, about in FIGURE_SUITES.items():
        rows = a.get("suite_figures", {}).get(module, [])
        out += [f"## {SUITES[module]}", "", about, ""]
        out += table(["figure", "labels", "value", "test"], rows)
    if leaks:
        out += ["## Leaks found", ""]
        out += table(
            ["what", "amount", "tolerated", "test"],
            [
                [x["what"], f"{num(x['value'])} {x['unit']}", num(x["tolerance"]), f"`{x['test']}`"]
                for x in leaks
            ],
        )
    if a.get("growth_within_tolerance"):
        out += ["## Growth within tolerance (not a leak)", ""]
        out += table(
            ["what", "measured", "tolerated", "test"],
            [
                [x["what"], f"{num(x['value'])} {x['unit']}", f"{num(x['tolerance'])} {x['unit']}",
                 f"`{x['test'].split('::', 1)[1]}`"]
                for x in a["growth_within_tolerance"]
            ],
        )  # fmt: skip
    if a["failures"]:
        out += ["## Failures", ""]
        out += table(
            ["test", "message"], [[f"`{f['test']}`", f["message"][:240]] for f in a["failures"]]
        )
    if a["skips"]:
        out += ["## Skipped", ""]
        out += table(["test", "why"], [[f"`{s['test']}`", s["message"]] for s in a["skips"]])
    return "\n".join(out).rstrip() + "\n"


def load_line(m: dict[str, Any]) -> list[str]:
    """The machine's load average before and after the run (it is shared)."""
    before, after = m.get("loadavg"), m.get("loadavg_after")
    if not before:
        return []
    text = f"- **Load average (1, 5, 15 min):** {' '.join(map(str, before))} before"
    return [text + (f", {' '.join(map(str, after))} after" if after else "")]


def mark(result: str) -> str:
    return {"passed": "pass", "blocked": "blocked"}.get(result, f"**{result.upper()}**")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "reliability")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="render the doc from an earlier run's JSON and recorded figures",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="SECONDS",
        help="run only the 16-client load for SECONDS, sampling the daemon's fds, threads, RSS",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    data = args.out / "reliability.json"
    if args.render_only:
        report = json.loads(data.read_text())
        figures_file = args.out / "figures.jsonl"
        if figures_file.exists():  # the same figures, summed up by this version of the code
            tests = read_junit(args.out / "junit.xml")
            report["aggregate"] = aggregate(read_figures(figures_file), tests)
        rc = 0 if report["aggregate"]["tests"]["failed"] == 0 else 1
    else:
        before = machine()
        rc, seconds = run_tests(args.out, args.pytest_args, args.soak)
        tests = read_junit(args.out / "junit.xml")
        figures = read_figures(args.out / "figures.jsonl")
        before["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        report = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": seconds,
            "pytest_exit": rc,
            "soak": args.soak,
            "machine": before,
            "aggregate": aggregate(figures, tests),
            "tests": tests,
        }
        data.write_text(json.dumps(report, indent=1, default=sorted) + "\n")
    args.doc.write_text(render(report))
    print(f"wrote {args.doc} from {data}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
