"""Verbose tracing of one scenario: every log line stamped with virtual time and the node it came from, and the
scenario's trace written out line by line at the end."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from cfnode.testing.clock import CURRENT_NODE, virtual_now

logger = logging.getLogger("cfnode.testing.trace")


class VirtualTimeFilter(logging.Filter):
    """Adds `vt` (virtual seconds) and `node` (harness name, or "harness") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.vt = virtual_now()
        record.node = CURRENT_NODE.get() or "harness"
        return True


@contextlib.contextmanager
def verbose(level: int = logging.INFO) -> Iterator[None]:
    """Send cfnode's logs to stderr with virtual time and node name, for the length of the block."""
    handler = logging.StreamHandler()
    handler.addFilter(VirtualTimeFilter())
    handler.setFormatter(logging.Formatter("%(vt)9.3f %(node)-7s %(levelname).1s %(name)s: %(message)s"))
    cf = logging.getLogger("cfnode")
    old_level, old_propagate = cf.level, cf.propagate
    cf.addHandler(handler)
    cf.setLevel(level)
    cf.propagate = False
    try:
        yield
    finally:
        cf.removeHandler(handler)
        cf.setLevel(old_level)
        cf.propagate = old_propagate


def format_row(row: tuple[Any, ...]) -> str:
    t, kind, *rest = row
    return f"{t:9.3f} {kind:6s} " + " ".join(str(x) for x in rest)


def log_trace(trace: list[tuple[Any, ...]]) -> None:
    for row in trace:
        logger.info("%s", format_row(row))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence cfnode's own logging for the block (a scenario logs thousands of expected warnings; the harness
    records what matters, and a replay with `verbose()` shows the rest)."""
    cf = logging.getLogger("cfnode")
    old = cf.level
    cf.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        cf.setLevel(old)
