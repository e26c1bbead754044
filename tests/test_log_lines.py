"""A console log line is one line, whatever a client sent: an encoded newline in an HTTP path or a
filename must not forge a log line of its own."""

from __future__ import annotations

import logging

from services.shared.logging import ConsoleFormatter, JsonFormatter


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("access", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_control_characters_from_a_client_are_escaped_in_console_lines():
    forged = "/v1/jobs/abc\n05:09:09.999 ERRO forged: INJECTED\r\x1b[2K\u2028x"
    line = ConsoleFormatter().format(_record("%s %s %d", "GET", forged, 404, upload="a\nb.wav"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "GET /v1/jobs/abc\\n05:09:09.999 ERRO forged: INJECTED\\r\\x1b[2K\\u2028x 404" in line
    assert "upload=a\\nb.wav" in line


def test_tracebacks_keep_their_lines():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = ConsoleFormatter().format(record)
    assert text.splitlines()[0].endswith("x: failed") and "Traceback" in text


def test_json_lines_are_single_lines_too():
    assert "\n" not in JsonFormatter().format(_record("%s", "a\nb"))
