"""memplugd: the memory-populate daemon (engine, backings, kernel layer, transports)."""

from __future__ import annotations

import functools


def __getattr__(name: str) -> str:
    # __version__ is looked up on first use, not on import: importlib.metadata
    # takes ~0.1 s of CPU to import, and every allocation helper
    # (python -m memplug.daemon.kernel.helper, one per worker of a charged
    # plug) imports this package without ever needing the version.
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memplug")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
