"""Maps the top-level source folders into the single `memplug` namespace.

Packages are discovered by walking each folder for __init__.py, so a new
subpackage can never be left out of the wheel (an explicit list would still
work in an editable install and then break in a real one).
"""

from pathlib import Path

from setuptools import setup

NAMESPACE_ROOTS = {
    "memplug.daemon": "daemon",
    "memplug.client": "client",
    "memplug.v1": "proto/memplug/v1",
    "memplug.common": "common",
}


def discover() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for package, folder in NAMESPACE_ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            name = ".".join([package, *init.parent.relative_to(folder).parts])
            packages.append(name)
            package_dir[name] = init.parent.as_posix()
    return packages, package_dir


packages, package_dir = discover()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={name: ["py.typed", "*.pyi", "*.proto"] for name in packages},
)
