"""JSON log lines: one object a line, with the record's extras and any exception."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from citadel.log import JsonFormatter, configure_logging


def record(message: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    """A log record as ``logger.info(message, *args, extra=extra)`` makes it."""
    exc_info = sys.exc_info() if exc else None
    logger = logging.getLogger("citadel.test")
    return logger.makeRecord(
        "citadel.test", logging.INFO, __file__, 1, message, args, exc_info, extra=extra
    )


def formatted(rec: logging.LogRecord) -> Any:
    """The record formatted for the service ``gateway``: one line, parsed back."""
    line = JsonFormatter("gateway").format(rec)
    assert "\n" not in line
    return orjson.loads(line)


def test_standard_fields() -> None:
    """A record becomes ts, level, logger, message (arguments applied) and service."""
    entry = formatted(record("hello %s", "world"))
    assert {
        "level": "info",
        "logger": "citadel.test",
        "message": "hello world",
        "service": "gateway",
    } == {key: entry[key] for key in ("level", "logger", "message", "service")}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]) is not None


def test_only_the_expected_keys_without_extras() -> None:
    """A plain record carries no LogRecord internals."""
    assert {"ts", "level", "logger", "message", "service"} == set(formatted(record("x")))


def test_extras_are_kept_and_anything_becomes_json() -> None:
    """Fields passed with ``extra=`` are logged; values JSON cannot hold are logged as text."""

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    entry = formatted(record("x", port=8080, path="/v1", nested={"a": [1, 2]}, obj=Opaque()))
    assert (8080, "/v1", {"a": [1, 2]}, "opaque!") == (
        entry["port"],
        entry["path"],
        entry["nested"],
        entry["obj"],
    )


def test_newlines_stay_inside_one_line() -> None:
    """A message with newlines is still one line of JSON."""
    assert "two\nlines" == formatted(record("two\nlines"))["message"]


def test_exception_text_is_included() -> None:
    """A record with exc_info carries the formatted traceback as ``exception``."""
    try:
        raise ValueError("bad value")
    except ValueError:
        entry = formatted(record("failed", exc=True))
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("ValueError: bad value")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_configure_logging_writes_json_lines_to_stderr(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """After configure_logging, records at or above the level go to stderr, one JSON a line."""
    configure_logging("simulator", "warning")
    logger = logging.getLogger("citadel.test")
    logger.info("hidden")
    logger.warning("shown %d", 1, extra={"port": 1})
    logger.error("also shown")
    lines = capsys.readouterr().err.splitlines()
    assert [("shown 1", "simulator", 1), ("also shown", "simulator", None)] == [
        (entry["message"], entry["service"], entry.get("port"))
        for entry in map(orjson.loads, lines)
    ]
