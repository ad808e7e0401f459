"""The import-linter contracts in pyproject.toml hold, and they catch a forbidden import.

`make lint` runs lint-imports on the installed tree; these tests run it on a
copy laid out as the installed namespace, once as it is (kept) and once with
one upward import added per contract (broken, naming the offending line).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = {"common": "common", "daemon": "daemon", "client": "client", "v1": "proto/memplug/v1"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_tree(dest: Path) -> Path:
    package = dest / "memplug"
    package.mkdir()
    for name, folder in LAYOUT.items():
        shutil.copytree(
            ROOT / folder,
            package / name,
            ignore=shutil.ignore_patterns("__pycache__", "bench"),
        )
    # A regular package on PYTHONPATH wins over the installed namespace portions.
    (package / "__init__.py").touch()
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_contracts_hold(tmp_path: Path) -> None:
    proc = _lint(_copy_tree(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "daemon/kernel/ops.py",
            "from memplug.daemon.engine import region",
            "The daemon's layers import only downward",
        ),
        (
            "daemon/backings/base.py",
            "from memplug.daemon.transport import servicer",
            "The daemon's layers import only downward",
        ),
        (
            "client/types.py",
            "from memplug.daemon.engine import strategy",
            "The client speaks only the API (memplug.v1) and the shared floor",
        ),
        (
            "common/ranges.py",
            "from memplug.daemon import metrics",
            "The shared floor and the generated API import nothing above them",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / "memplug" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    proc = _lint(tree)
    assert proc.returncode != 0, proc.stdout
    assert f"{contract} BROKEN" in proc.stdout, proc.stdout
