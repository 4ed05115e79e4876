"""Log set-up: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
import time

# what every LogRecord has; anything else was passed as ``extra=`` (request_id, upstream) and is a field
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


_second: tuple[int, str] = (-1, "")  # the last second formatted: one strftime a second, not one a line


def utc(created: float) -> str:
    """A moment as ISO 8601 in UTC with milliseconds: 2026-12-01T23:10:48.123Z."""
    global _second
    second, text = _second
    if int(created) != second:
        second, text = int(created), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        _second = (second, text)
    return f"{text}.{int(created * 1000) % 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v not in (None, "")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; each ``extra`` (request_id, upstream) is a key of its own."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` and each ``extra`` as ``key=value`` after it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = _extras(record)
        return line + "".join(f" {k}={v}" for k, v in extras.items()) if extras else line


def configure(fmt: str, level: str) -> None:
    """The root logger on stderr in ``fmt`` (text or json) at ``level`` (any case)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt.lower() == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
