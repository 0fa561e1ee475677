"""An executor that runs each submitted call at once on the caller's thread (the loop's): torch work happens in
submission order, so a run is deterministic and no thread is ever started.

`loop.run_in_executor` wraps the finished future and hands the result back with `call_soon_threadsafe`, which
also writes a byte to the loop's self-pipe; the virtual-time selector drains it with a zero-timeout poll.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class InlineExecutor(Executor):
    def __init__(self) -> None:
        self._shutdown = False
        self.calls = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()
        self.calls += 1
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine, like a thread pool does
            future.set_exception(e)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
