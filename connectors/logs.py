"""Structured logs: one JSON object per line on stderr.

Log shippers (Loki, Elasticsearch, Cloud Logging) parse JSON lines without per-format
rules; ``extra={"fields": {...}}`` adds keys to the object.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["JsonFormatter", "RepeatFilter", "setup_logging"]

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


class RepeatFilter(logging.Filter):
    """Lets one line of each kind through per ``interval_s`` from third-party loggers.

    kafka-python logs some conditions on every metadata refresh (a missing topic: about
    18 lines a second), which would drown everything else. Driftloop's own lines are
    never held back: each says what matters once. The first line after a quiet spell
    carries how many like it were held back (``repeated``).
    """

    def __init__(self, prefixes: tuple[str, ...] = ("kafka",), interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[tuple[str, Any, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.msg, repr(record.args))
        now = self.clock()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[key] = (last, held + 1)
                return False
            if len(self._seen) > 1_000:  # bounded: distinct lines are few
                self._seen.clear()
            self._seen[key] = (now, 0)
        if held:
            fields = getattr(record, "fields", None)
            record.fields = {**(fields if isinstance(fields, dict) else {}), "repeated": held}
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own log line
    # says what matters once.
    logging.getLogger("kafka").setLevel(max(logging.getLevelName(level), logging.ERROR))
