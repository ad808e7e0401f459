"""`python -m bench`: run the sections, print the markdown, save it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from types import FrameType

from bench import machine
from bench.context import Bench, Options
from bench.report import Section, dump_json, render
from bench.sections import SECTIONS

DEFAULT_OUTPUT = Path("docs/bench.md")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark memplugd against the raw kernel paths and QEMU's prealloc.",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 7)")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3 repetitions, small sizes; not saved"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every sample as JSON")
    p.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help=f"where to write the markdown (default {DEFAULT_OUTPUT}, none with --quick); "
        "'-' for nowhere",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop below 0.5",
    )
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = wanted
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: every cleanup runs


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    options = Options.make(reps=args.reps, quick=args.quick)
    if args.wait_quiet > 0:
        load = machine.sleep_until_quiet(0.5, args.wait_quiet)
        print(f"[bench] load average {load:.2f}", file=sys.stderr)
    sections: list[Section] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="memplug-bench-")))
        bench = Bench(options, workdir, stack)
        header = machine.header(
            qemu=bench.qemu, state_dir=workdir, reps=options.reps, threads=options.threads
        )
        for key in args.sections:
            try:
                sections.append(SECTIONS[key](bench))
            except Exception as exc:
                traceback.print_exc()
                sections.append(Section(key, key, error=repr(exc)))
        header.append(("load average at end", f"{machine.load_average():.2f}"))
    markdown = render(header, sections, quick=options.quick)
    print(markdown)
    output = args.output or (None if options.quick else DEFAULT_OUTPUT)
    if output is not None and str(output) != "-":
        output.write_text(markdown)
        print(f"[bench] wrote {output}", file=sys.stderr)
    if args.json is not None:
        dump_json(args.json, header, dataclasses.asdict(options), sections)
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    return 1 if any(s.error for s in sections) else 0
