"""memplugd entry point: parse the configuration, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from memplug.daemon import __version__
from memplug.daemon.config import load
from memplug.daemon.errors import MemplugError
from memplug.daemon.server import Daemon
from memplug.daemon.transport.unixsock import StartupError


def setup_logging(level: str) -> None:
    # journald stamps each line itself; elsewhere we add the time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        level=level.upper(),
        format=f"{stamp}level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = load(argv)
    except MemplugError as exc:
        print(f"memplugd: {exc}", file=sys.stderr)
        return 2
    if args.version:
        print(f"memplugd {__version__}")
        return 0
    setup_logging(config.log_level)
    daemon = Daemon(config, reload_config=lambda: load(argv)[0])
    stop = threading.Event()
    reload = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        daemon.start()
    except (StartupError, OSError) as exc:
        print(f"memplugd: cannot start: {exc}", file=sys.stderr)
        daemon.stop()
        return 1
    while not stop.wait(0.2):
        if reload.is_set():
            reload.clear()
            daemon.reload()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
