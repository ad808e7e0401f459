"""The wheel holds every module under the one `memplug` namespace, and imports from itself.

An editable install would hide a subpackage missing from the wheel (it maps
folders, not a package list), so this builds the real wheel. The measuring
tools in bench/ (the benchmark and the reliability runner) stay out of both
the wheel and the container image.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"daemon": "memplug/daemon", "client": "memplug/client", "proto/memplug/v1": "memplug/v1"}
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # pip builds in the source tree, and setuptools adds whatever an earlier build
    # left in build/lib (a module since moved or deleted): build from a clean copy.
    source = tmp_path_factory.mktemp("source") / "memplug"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--disable-pip-version-check", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )  # fmt: skip
    (built,) = out.glob("memplug-*.whl")
    return built


def test_every_source_module_is_in_the_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in FOLDERS.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert expected, "found no sources"
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    for typed in ("memplug/daemon/py.typed", "memplug/client/py.typed", "memplug/v1/py.typed"):
        assert typed in names
    assert "memplug/v1/memplug_pb2.pyi" in names


def test_nothing_installs_a_top_level_daemon_or_client(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops - {"memplug"} <= {n for n in tops if n.endswith(".dist-info")}
    entry_points = next(
        zipfile.ZipFile(wheel).read(n).decode()
        for n in zipfile.ZipFile(wheel).namelist()
        if n.endswith("entry_points.txt")
    )
    assert "memplugd = memplug.daemon.__main__:main" in entry_points
    assert "memplug = memplug.client.cli:main" in entry_points


def test_the_wheel_imports_from_itself(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import memplug.daemon.server, memplug.daemon.engine.engine, memplug.client.cli, "
        "memplug.v1.memplug_pb2_grpc; "
        "assert memplug.daemon.server.__file__.startswith(sys.argv[1]), "
        "memplug.daemon.server.__file__"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)


def test_no_measuring_tool_is_in_the_wheel(wheel: Path) -> None:
    tools = {path.read_bytes() for path in BENCH.rglob("*.py") if "__pycache__" not in path.parts}
    tools.discard(b"")  # an empty module would match every empty __init__.py
    assert (BENCH / "__main__.py").is_file() and (BENCH / "reliability.py").is_file()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        by_name = [n for n in names if "bench" in n.split("/") or "reliability" in n]
        assert not by_name, f"measuring tools in the wheel: {by_name}"
        # A copy under any other name (e.g. a module moved into daemon/) is caught by content.
        copies = [n for n in names if n.endswith(".py") and archive.read(n) in tools]
    assert not copies, f"files of bench/ in the wheel: {copies}"


def _dockerignored(top: str) -> bool:
    """Whether .dockerignore leaves the top-level folder `top` out of the build context."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        if pattern.lstrip("!").strip("/") in (top, f"{top}/**"):
            ignored = not negated  # the last matching line wins, as in docker
    return ignored


def test_the_image_copies_no_measuring_tool() -> None:
    assert BENCH.is_dir()
    tool = BENCH.relative_to(ROOT).as_posix()
    # COPY from the build context (not --from=STAGE): its sources, before the destination.
    sources = [
        word
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.split()[:1] == ["COPY"] and not any(w.startswith("--from") for w in line.split())
        for word in [w for w in line.split()[1:] if not w.startswith("--")][:-1]
    ]
    assert "daemon" in sources, f"found no sources in the Dockerfile's COPY lines: {sources}"
    for source in sources:
        path = source.strip("/").removeprefix("./") or "."
        assert path != tool and not path.startswith(f"{tool}/"), f"the image copies {source}"
        holds_tool = path in (".", "*") or tool.startswith(f"{path}/")
        assert not holds_tool or _dockerignored(tool), (
            f"COPY {source} brings {tool}/ into the image; list it in .dockerignore"
        )
