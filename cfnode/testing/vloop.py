"""A virtual-time asyncio event loop: `time()` is a number the loop advances itself, so sleeps, timeouts and
heartbeats cost no wall time and a run is a pure function of its inputs.

The selector never blocks: it polls the real file descriptors (the loop's self-pipe, which
`call_soon_threadsafe` writes to) with a zero timeout, and when nothing is ready it jumps the clock to the next
timer. A loop with nothing ready and no timer left is deadlocked: `DeadlockError` names the seed.
"""

from __future__ import annotations

import asyncio
import math
import selectors
import time
from typing import Any

from cfnode.testing.executor import InlineExecutor


class DeadlockError(RuntimeError):
    """Nothing is ready and nothing is scheduled: every task waits on something that can never happen."""


class WallClockExceeded(RuntimeError):
    """A scenario used more real time than its budget (a busy loop in virtual time, or a hang)."""


class VirtualTimeExceeded(RuntimeError):
    """The loop's virtual clock passed its hard limit (the scenario's own limit did not stop it)."""


class VirtualSelector(selectors.BaseSelector):
    """Delegates registration to a real selector; `select(timeout)` advances `now` by `timeout` instead of
    sleeping."""

    def __init__(self, *, label: str, hard_limit_s: float, wall_budget_s: float) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0
        self.label = label
        self.hard_limit_s = hard_limit_s
        self._wall_deadline = time.monotonic() + wall_budget_s
        self.iterations = 0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.iterations += 1
        if not self.iterations % 1024 and time.monotonic() > self._wall_deadline:
            raise WallClockExceeded(f"{self.label}: real-time budget exhausted at virtual t={self.now:.3f}s")
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            raise DeadlockError(f"{self.label}: deadlock at virtual t={self.now:.3f}s: no callback is ready and "
                                "no timer is scheduled")
        if timeout > 0:
            later = self.now + timeout
            self.now = later if later > self.now else math.nextafter(self.now, math.inf)
            if self.now > self.hard_limit_s:
                raise VirtualTimeExceeded(f"{self.label}: virtual time passed the hard limit "
                                          f"{self.hard_limit_s:.1f}s")
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """`asyncio.SelectorEventLoop` on virtual time. `label` (e.g. "seed 17") names the run in errors."""

    def __init__(self, *, label: str = "virtual loop", hard_limit_s: float = 3600.0,
                 wall_budget_s: float = 120.0) -> None:
        self.vselector = VirtualSelector(label=label, hard_limit_s=hard_limit_s, wall_budget_s=wall_budget_s)
        super().__init__(self.vselector)
        self._default_executor = InlineExecutor()  # asyncio.to_thread runs inline too: no thread ever starts

    def time(self) -> float:
        return self.vselector.now
