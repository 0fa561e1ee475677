"""Logging setup (text or JSON lines) and the swarm events log.

Events (joined, claimed, step aborted, neighbour lost, ...) go to the `cfnode.events` logger and, when a path
is configured, to a JSON-lines file that `cfnode demo` and operators read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

events_logger = logging.getLogger("cfnode.events")
PEER_CHARS = 12
"""Log lines and events show this many leading characters of a peer id (the events log's `peer` field)."""

_context: dict[str, Any] = {"peer": None, "stage": None, "step": None}
"""Who is logging: this process' node (one per process). Set by the node where these change."""


def set_log_context(**fields: Any) -> None:
    """Update the peer / stage / step every log line of this process carries; `None` clears a field."""
    unknown = set(fields) - set(_context)
    if unknown:
        raise TypeError(f"unknown log context fields {sorted(unknown)}")
    _context.update(fields)


@contextlib.contextmanager
def kept_log_context() -> Iterator[None]:
    """Restore this process's log context after the block (in-process nodes, as the local experiment engine
    runs them, set it as they go)."""
    saved = dict(_context)
    try:
        yield
    finally:
        _context.clear()
        _context.update(saved)


def log_context() -> dict[str, Any]:
    """The current context with the peer id shortened; fields that are not set are omitted."""
    out = {k: v for k, v in _context.items() if v is not None}
    if "peer" in out:
        out["peer"] = str(out["peer"])[:PEER_CHARS]
    return out


class ContextFilter(logging.Filter):
    """Stamps each record with the node context: `record.ctx` (text, e.g. ` [peer 12D3KooWabcd stage 2 step
    41]`, empty before a node exists) and `record.cf_context` (a dict for JSON)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = log_context()
        record.cf_context = ctx
        record.ctx = f" [{' '.join(f'{k} {v}' for k, v in ctx.items())}]" if ctx else ""
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               **getattr(record, "cf_context", log_context()), "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def text_formatter(prefix: str = "") -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s%(ctx)s: %(message)s",
                             datefmt="%H:%M:%S")


def setup_logging(level: str = "INFO", fmt: str = "text", prefix: str = "") -> None:
    """Configure the root logger once per process; hivemind's own handlers are left to hivemind. Every line
    carries the node context (peer, stage, step) once the node has set it (`set_log_context`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(text_formatter(prefix))
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
