"""Regenerates the protobuf/gRPC modules and their .pyi stubs from proto/.

    python scripts/gen_proto.py            # write into proto/ (commit the result)
    python scripts/gen_proto.py --check    # exit 1 if the committed files drifted

Output lands beside the .proto (proto/memplug/v1/), which setup.py installs as
`memplug.v1`; protoc's imports (`from memplug.v1 import ...`) work unchanged.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
BIN = Path(sys.executable).parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        # The mypy plugins live beside this interpreter, which need not be on PATH.
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed() -> list[Path]:
    return sorted(
        p.relative_to(PROTO_ROOT)
        for p in PROTO_ROOT.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        drifted = [
            str(p)
            for p in fresh
            if not (PROTO_ROOT / p).exists()
            or not filecmp.cmp(Path(tmp) / p, PROTO_ROOT / p, shallow=False)
        ]
        stale = [str(p) for p in committed() if p not in fresh]
    if drifted or stale:
        print(
            "generated code drifted from proto/; run `make protos`:", *drifted, *stale, sep="\n  "
        )
        return 1
    print("generated code matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
