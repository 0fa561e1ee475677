"""Logging setup (text or JSON lines) and the swarm events log.

Events (joined, claimed, step aborted, neighbour lost, ...) go to the `cfnode.events` logger and, when a path
is configured, to a JSON-lines file that `cfnode demo` and operators read.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

events_logger = logging.getLogger("cfnode.events")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text", prefix: str = "") -> None:
    """Configure the root logger once per process; hivemind's own handlers are left to hivemind."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    cf = logging.getLogger("cfnode")
    cf.setLevel(level.upper())
    if level.upper() != "DEBUG":
        logging.getLogger("asyncio").setLevel(logging.WARNING)


class EventLog:
    """Append-only JSON-lines event log; thread-safe; one line per event."""

    def __init__(self, path: str | None, **static: Any) -> None:
        self.path = path
        self.static = static
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = {"ts": round(time.time(), 3), "event": event, **self.static, **fields}
        events_logger.info("%s %s", event, json.dumps(fields, default=str))
        if self.path is None:
            return
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
