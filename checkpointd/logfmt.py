"""Log formats for checkpointd: plain text for a terminal, one JSON object per line for a
log pipeline (journald -> Loki/Elasticsearch) that must filter on the HA decision's fields.

A JSON line holds ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``msg``,
then every ``extra=`` field the caller gave (``role``, ``reason``, ``epoch``, ``conn``...),
and ``exc`` with the traceback when there is one. The agent logs each HA decision as
``log.info(text, extra={"role": ..., "reason": ...})``: the same reason sentence that
status and tests read (Patroni's style) becomes a field a query can match exactly.

The text format appends the extra fields as ``key=value`` so nothing given in ``extra``
is lost when an operator runs the agent in a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMATS = ("text", "json")

# attributes every LogRecord has: whatever else is on a record came from ``extra=``
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_BASE = ("ts", "level", "logger", "msg")


def extras(record: logging.LogRecord) -> dict:
    """The fields given through ``extra=``, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def rfc3339(created: float) -> str:
    """``1714566896.789`` -> ``"2024-05-01T12:34:56.789Z"`` (milliseconds truncated)."""
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(created))) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on an extra value JSON cannot encode
    (it is written as its ``str``), since a log line must not cost the agent a decision."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": rfc3339(record.created), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        for key, value in extras(record).items():
            out[f"extra_{key}" if key in _BASE else key] = value  # ours win, theirs kept
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:34:56.789Z INFO checkpointd primary: acquired ... role=primary``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{rfc3339(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        fields = extras(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (not text or any(c in text for c in ' "=\n')) else text


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format {fmt!r} must be one of {', '.join(FORMATS)}")


def configure(fmt: str = "text", level: int | str = logging.INFO, *, stream=None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr: journald captures it) in ``fmt``,
    replacing the root logger's handlers, so calling it twice does not print twice."""
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"unknown log level {level!r}")
        level = logging.getLevelName(name)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler
