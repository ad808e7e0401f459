"""The daemon's log lines: key=value quoting and the fields each line carries."""

from __future__ import annotations

import json
import logging

import pytest

from memplug.daemon.__main__ import JsonFormatter, KeyValueFormatter


def record(**fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("memplug.rpc", logging.INFO, "", 0, "rpc", None, None)
    rec.fields = fields
    return rec


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (2097152, "2097152"),
        (1.5, "1.5"),
        (True, "True"),
        ("vm0", "vm0"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("line\nbreak", '"line\\nbreak"'),
    ],
)
def test_key_value_quotes_only_what_would_split_the_line(value: object, shown: str) -> None:
    line = KeyValueFormatter("%(message)s").format(record(k=value))
    assert line == f"rpc k={shown}"


def test_json_keeps_the_fields_typed() -> None:
    event = json.loads(JsonFormatter(timestamps=False).format(record(length=4096, region="a b")))
    assert event == {
        "level": "info",
        "logger": "memplug.rpc",
        "msg": "rpc",
        "length": 4096,
        "region": "a b",
    }


def test_key_value_time_matches_the_standard_formatter_across_seconds() -> None:
    ours, stock = KeyValueFormatter("%(asctime)s"), logging.Formatter("%(asctime)s")
    for created in (1796692183.0, 1796692183.999, 1796692184.0005, 1796692184.5, 1796692250.25):
        rec = record()
        rec.created, rec.msecs = created, (created - int(created)) * 1000
        assert ours.format(rec) == stock.format(rec)
