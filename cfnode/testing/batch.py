"""Many seeds at once: each scenario's outcome reduced to a picklable summary, computed in `jobs` forked worker
processes (a scenario is single-threaded; the machine's cores run seeds side by side) or in-process. `fn` turns
a key (a seed; for the groups scenarios a (family, seed) pair) into its summary."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

from cfnode.testing.runner import run_scenario


@dataclass(frozen=True)
class Summary:
    seed: int
    ok: bool
    report: str
    digest: str
    kinds: tuple[str, ...]
    wall_s: float
    virtual_s: float


def summarise(seed: int) -> Summary:
    o = run_scenario(seed)
    return Summary(seed, o.ok, o.report(), o.digest, o.scenario.kinds, o.wall_s, o.virtual_s)


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class Batch:
    """Outcomes of `seeds`, started at once in a pool of `jobs` processes (fork: the workers inherit the
    imported modules and caches); `get(seed)` waits for one."""

    def __init__(self, seeds: Sequence[Hashable], jobs: int, fn: Callable[[Any], Any] = summarise) -> None:
        self.seeds = list(seeds)
        self.fn = fn
        self._pool: Pool | None = None
        self._pending: dict[Hashable, AsyncResult[Any]] = {}
        self._done: dict[Hashable, Any] = {}
        if jobs > 1 and len(self.seeds) > 1:
            self._pool = multiprocessing.get_context("fork").Pool(jobs)
            self._pending = {s: self._pool.apply_async(fn, (s,)) for s in self.seeds}

    def get(self, seed: Hashable, timeout_s: float = 600.0) -> Any:
        if seed not in self._done:
            pending = self._pending.pop(seed, None)
            self._done[seed] = pending.get(timeout_s) if pending is not None else self.fn(seed)
        return self._done[seed]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
