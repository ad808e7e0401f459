"""The wheel holds every module under the one `memplug` namespace, and imports from itself.

An editable install would hide a subpackage missing from the wheel (it maps
folders, not a package list), so this builds the real wheel.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"daemon": "memplug/daemon", "client": "memplug/client", "proto/memplug/v1": "memplug/v1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--disable-pip-version-check", "-w", str(out), str(ROOT)],
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
        "memplug.v1.memplug_pb2_grpc, memplug.daemon.bench; "
        "assert memplug.daemon.server.__file__.startswith(sys.argv[1]), "
        "memplug.daemon.server.__file__"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)


def test_the_license_is_an_spdx_expression(wheel: Path) -> None:
    """PEP 639: `License-Expression`, not the deprecated table that warns at every build."""
    zf = zipfile.ZipFile(wheel)
    metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    lines = metadata.decode().splitlines()
    assert "License-Expression: Apache-2.0" in lines, metadata.decode()[:2000]
