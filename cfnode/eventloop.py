"""The node process's asyncio event loop: uvloop (libuv, the design card's choice) or the standard library's.
hivemind's own DHT process runs on uvloop too (`hivemind.utils.switch_to_uvloop`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory(kind: str) -> Any:
    """A callable that makes a new event loop of this kind; uvloop falls back to asyncio where it cannot be
    imported (it has no Windows build), with a warning."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            logger.warning("uvloop is not installed; running on the standard asyncio event loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_loop(main: Coroutine[Any, Any, T], kind: str) -> T:
    """`asyncio.run(main)` on an event loop of this kind (`NetworkConfig.event_loop`)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
