"""Structured logs for every component (G9): one JSON object per line, never a secret or a signature."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed in ``extra=`` and belongs in the JSON object.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

# Defence in depth: if a query string ever reaches a log line, its signature and nonce do not.
_SENSITIVE = re.compile(r"(?i)\b(signature|rc-signature|nonce|rc-nonce|app_?secret\w*)=([^&\s\"']*)")


def redact(text: str) -> str:
    return _SENSITIVE.sub(lambda m: f"{m.group(1)}=[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        )
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line = f"{line} {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return redact(line)


class RepeatFilter(logging.Filter):
    """Let one line through per message template and interval; the rest of a burst is counted, not printed.

    While Kafka is down its client logs every reconnect attempt; one line every interval says the same.
    """

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (uvicorn's included) through one handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The access log prints query strings, which carry the signature; the gateway logs requests itself.
    logging.getLogger("uvicorn.access").disabled = True
    # aiokafka's INFO lines are per-connection chatter; the breaker's own log lines say what matters.
    kafka_logger = logging.getLogger("aiokafka")
    if logging.getLogger().getEffectiveLevel() < logging.WARNING:
        kafka_logger.setLevel(logging.WARNING)
    # Filters on a logger do not apply to its children's records, so filter at the handler by name.
    handler.addFilter(_KafkaRepeats())


class _KafkaRepeats(RepeatFilter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("aiokafka") or super().filter(record)
