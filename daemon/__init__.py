"""memplugd: the memory-populate daemon (engine, backings, kernel layer, transports)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memplug")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
