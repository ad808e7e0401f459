"""memplugd entry point: parse the configuration, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

from memplug.common.errors import MemplugError, StartupError
from memplug.daemon import __version__
from memplug.daemon.config import load, under_journald
from memplug.daemon.server import Daemon


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields (extra={"fields": {...}}) are merged in."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {}
        if self.timestamps:
            event["ts"] = round(record.created, 6)
        event.update(level=record.levelname.lower(), logger=record.name, msg=record.getMessage())
        event.update(getattr(record, "fields", {}))
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class KeyValueFormatter(logging.Formatter):
    """level=... logger=... message k=v ...; the fields go after the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
        return line


def _kv(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def setup_logging(level: str, fmt: str) -> None:
    # journald stamps each line itself; elsewhere we add the time.
    journald = under_journald()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(timestamps=not journald))
    else:
        stamp = "" if journald else "%(asctime)s "
        handler.setFormatter(
            KeyValueFormatter(f"{stamp}level=%(levelname)s logger=%(name)s %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    try:
        config, args = load(argv)
    except MemplugError as exc:
        print(f"memplugd: {exc}", file=sys.stderr)
        return 2
    if args.version:
        print(f"memplugd {__version__}")
        return 0
    setup_logging(config.log_level, config.log_format)
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
