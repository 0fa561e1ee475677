"""Many seeds at once: each scenario's outcome reduced to a picklable summary, computed in `jobs` forked worker
processes (a scenario is single-threaded; the machine's cores run seeds side by side) or in-process."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult, Pool

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

    def __init__(self, seeds: list[int], jobs: int) -> None:
        self.seeds = seeds
        self._pool: Pool | None = None
        self._pending: dict[int, AsyncResult[Summary]] = {}
        self._done: dict[int, Summary] = {}
        if jobs > 1 and len(seeds) > 1:
            self._pool = multiprocessing.get_context("fork").Pool(jobs)
            self._pending = {s: self._pool.apply_async(summarise, (s,)) for s in seeds}

    def get(self, seed: int, timeout_s: float = 600.0) -> Summary:
        if seed not in self._done:
            pending = self._pending.pop(seed, None)
            self._done[seed] = pending.get(timeout_s) if pending is not None else summarise(seed)
        return self._done[seed]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
