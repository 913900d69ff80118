"""Log output: one line per event, ``key=value`` text or one JSON object.

Every log call in nbdserve writes its message as ``event=NAME key=value ...``;
values that may hold spaces are written with ``%r`` (a quoted Python string).
The JSON formatter parses that message back into fields, so a call site
needs no structured-logging API and stays a plain ``LOGGER.info(...)``: the
cost of parsing is paid only for lines that are actually emitted.
"""

from __future__ import annotations

import ast
import json
import logging
import re

# key=value, the value bare (no spaces) or a quoted Python/JSON string
_PAIR_RE = re.compile(
    r"""\s*([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)(?=\s|$)"""
)
_INT_RE = re.compile(r"-?\d+")
_FLOAT_RE = re.compile(r"-?\d+\.\d*(?:[eE][-+]?\d+)?")
# the keys each formatter writes itself: a message field may not replace them
_RESERVED = frozenset({"time", "level", "logger", "message", "exception"})


_BARE_RE = re.compile(r"[^\s\"'=]+")


def quote(value: str) -> str:
    """``value`` as a key=value value: bare when it can be, else a quoted string.

    For free text from outside (export names, paths) that may hold spaces.
    """
    return value if _BARE_RE.fullmatch(value) else repr(value)


def parse_fields(message: str) -> dict[str, object] | None:
    """The message's key=value pairs, or None if it is not wholly key=value."""
    fields: dict[str, object] = {}
    pos = 0
    while pos < len(message):
        match = _PAIR_RE.match(message, pos)
        if match is None:
            return None if message[pos:].strip() else fields
        key, raw = match.group(1), match.group(2)
        if key in _RESERVED:
            return None
        fields[key] = _value(raw)
        pos = match.end()
    return fields


def _value(raw: str) -> object:
    if raw[:1] in ("'", '"'):
        try:
            return str(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            return raw
    if _INT_RE.fullmatch(raw):
        return int(raw)
    if _FLOAT_RE.fullmatch(raw):
        return float(raw)
    return raw


class KeyValueFormatter(logging.Formatter):
    """``TIME level=info logger=NAME event=...``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        base = (
            f"{self.formatTime(record)} level={record.levelname.lower()} "
            f"logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


class JsonFormatter(logging.Formatter):
    """One JSON object per line: the message's key=value pairs become fields.

    A message that is not key=value (from a library) is kept whole as
    ``message``; a traceback is one ``exception`` string, so an event never
    spans lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        fields = parse_fields(message)
        if fields:
            doc.update(fields)
        else:
            doc["message"] = message
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)
