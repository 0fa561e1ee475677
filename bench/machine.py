"""How busy this machine is, for the benchmarks (they share it with other jobs): busy CPU-seconds of all
cores, and a wait for a quiet spell before measuring."""

from __future__ import annotations

import os
import time


def system_busy_s() -> float:
    """CPU seconds all cores of the machine have spent busy since boot (/proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields  # steal: taken by the hypervisor
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 20.0) -> float:
    """Wait (at most `max_wait_s`) until the machine was nearly idle for `window_s`; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_wait_s:
        before = system_busy_s()
        time.sleep(window_s)
        if (system_busy_s() - before) / window_s < threshold_cores:
            break
    return time.monotonic() - started
