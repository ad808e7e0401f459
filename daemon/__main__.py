"""memplugd entry point: parse the configuration, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import threading

from memplug.common.errors import MemplugError, StartupError
from memplug.daemon import __version__
from memplug.daemon.config import load, under_journald
from memplug.daemon.server import Daemon
from memplug.daemon.systemd import reload_running


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

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # strftime once a second, not once a line: a busy fd socket logs hundreds.
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp, self._second = super().formatTime(record, datefmt)[:19], second
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        if fields:
            line += " " + " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
        return line


_NEEDS_QUOTES = re.compile(r'[ "=\n]')


def _kv(value: object) -> str:
    if type(value) is int or type(value) is float:  # most fields: offsets, lengths, times
        return str(value)
    text = str(value)
    return json.dumps(text) if (not text or _NEEDS_QUOTES.search(text)) else text


# logging level -> syslog priority, which journald reads from a "<N>" line prefix.
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """One journal entry per event: "<N>" (its syslog priority) and one line.

    journald splits a stream at newlines and reads the priority only from a
    "<N>" prefix (SyslogLevelPrefix=yes, the default); without this every
    line is PRIORITY=6 and a traceback becomes many unrelated entries.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        priority = SYSLOG_PRIORITY.get(record.levelno, 3 if record.levelno > logging.INFO else 7)
        return f"<{priority}>" + " | ".join(line for line in text.splitlines() if line.strip())


def setup_logging(level: str, fmt: str) -> None:
    # Every RPC that changes something logs a line, and the fd socket one per fd
    # handed out: leave out what no format here shows (the caller's file and
    # line, thread, process), as the logging HOWTO's "Optimization" describes.
    # A line then costs about 30% less CPU.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # journald stamps each line itself; elsewhere we add the time.
    journald = under_journald()
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(timestamps=not journald)
    else:
        stamp = "" if journald else "%(asctime)s "
        formatter = KeyValueFormatter(f"{stamp}level=%(levelname)s logger=%(name)s %(message)s")
    handler.setFormatter(JournalFormatter(formatter) if journald else formatter)
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
    if args.reload_running is not None:
        ok, message = reload_running(args.reload_running, config.state_dir)
        print(f"memplugd: {message}", file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    setup_logging(config.log_level, config.log_format)
    daemon = Daemon(config, reload_config=lambda: load(argv)[0], takeover=args.takeover)
    stop = threading.Event()
    reload = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        daemon.start()
    except (StartupError, OSError) as exc:
        daemon.stop()
        # Last, so that it is the line an operator sees.
        prefix = "<3>" if under_journald() else ""
        print(f"{prefix}memplugd: cannot start: {exc}", file=sys.stderr)
        return 1
    while not stop.wait(0.2):
        if daemon.handed_over.is_set():  # a new memplugd serves every region now
            if args.after_handover == "exit":
                return 0
            # A restarted container would take the regions back: stay, idle, till SIGTERM.
            logging.getLogger("memplug.server").info("handed over: idle until SIGTERM")
            stop.wait()
            return 0
        if reload.is_set():
            reload.clear()
            daemon.reload()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
