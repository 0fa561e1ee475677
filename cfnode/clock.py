"""The clocks a node reads, as one injectable object: wall/DHT time (record expirations, bans) and a monotonic
clock (intervals). The protocol harness passes a virtual clock, with a per-node skew, so time is replayable."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds, the DHT's time base (hivemind's get_dht_time is time.time)."""
        ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
