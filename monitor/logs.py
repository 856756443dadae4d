"""Structured logs: one JSON object per line on stderr.

Log shippers (Loki, Elasticsearch, Cloud Logging) parse JSON lines without per-format
rules; ``extra={"fields": {...}}`` adds keys to the object.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "setup_logging"]

_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own log line
    # says what matters once.
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(level), logging.ERROR))
