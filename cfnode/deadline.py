"""Deadlines that hold even when the awaited code swallows cancellation.

`asyncio.wait_for` waits for the cancelled inner task to finish; a callee that ignores cancellation (seen with
hivemind stream calls to a peer that never answers) would hang the caller past its deadline. `within` returns
or raises at the deadline and leaves the cancelled task to finish on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
_ABANDONED: set[asyncio.Future[object]] = set()


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """Await with a hard deadline; raises TimeoutError when it passes."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        _ABANDONED.add(task)  # keep a reference until it really ends; retrieve its outcome then
        task.add_done_callback(_forget)
        raise TimeoutError(f"deadline of {timeout_s:.1f}s passed")
    return task.result()


def _forget(task: asyncio.Future[object]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()
