"""Virtual clocks: every node reads the loop's virtual time, DHT time with its own skew (the clock-skew fault).

`CURRENT_NODE` is a context variable set in each node's tasks (a task inherits the context it was created in),
so code that reads a module-level clock (`time.time()`) can still be given the calling node's skewed clock.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from dataclasses import dataclass

EPOCH = 1_700_000_000.0
"""DHT time at virtual t=0 (a plausible Unix time, so nothing mistakes it for an interval)."""

CURRENT_NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("cfnode_harness_node", default=None)
"""Name of the harness node whose task is running (None: the harness itself)."""


_ORDER = itertools.count()


def next_order() -> int:
    """A process-wide recording counter: sorts what the DHT, the transport and the cluster recorded into one
    chronology (only the relative order is used)."""
    return next(_ORDER)


def virtual_now() -> float:
    """Virtual seconds of the running loop (0.0 outside one)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return 0.0


@dataclass
class VirtualClock:
    """`cfnode.clock.Clock` for one node: monotonic = loop time; time = EPOCH + loop time + skew."""

    skew_s: float = 0.0

    def time(self) -> float:
        return EPOCH + virtual_now() + self.skew_s

    def monotonic(self) -> float:
        return virtual_now()


class ClockRegistry:
    """Clocks by node name, for the module-level time shim."""

    def __init__(self) -> None:
        self.clocks: dict[str, VirtualClock] = {}

    def for_current(self) -> VirtualClock | None:
        name = CURRENT_NODE.get()
        return None if name is None else self.clocks.get(name)


class TimeShim:
    """Stands in for the `time` module inside cfnode modules that read it directly (driver attempt ids,
    durations): wall time is the calling node's skewed virtual clock, intervals are virtual."""

    def __init__(self, registry: ClockRegistry) -> None:
        self._registry = registry

    def time(self) -> float:
        clock = self._registry.for_current()
        return clock.time() if clock is not None else EPOCH + virtual_now()

    def monotonic(self) -> float:
        return virtual_now()

    def perf_counter(self) -> float:
        return virtual_now()

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("time.sleep() on the virtual-time loop would block every node")
