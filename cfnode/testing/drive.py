"""Run a harness cluster until it is done: the one wait loop of the protocol harness (testing/runner.py) and of
the local experiment engine (experiment/localrun.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cfnode.testing import invariants as inv
from cfnode.testing.clock import virtual_now
from cfnode.testing.cluster import Cluster

FINISHED, CRASHED, UNRECOVERABLE, TIME_LIMIT = "finished", "crashed", "unrecoverable", "time limit"


async def run_until_done(cluster: Cluster, num_stages: int, *, limit_s: float, poll_s: float, settle_s: float,
                         stop_on_crash: bool = False, on_poll: Callable[[], None] | None = None) -> str:
    """Every `poll_s` virtual seconds (after `on_poll`): FINISHED once a node finished its run, CRASHED once a
    node crashed (only with `stop_on_crash`), UNRECOVERABLE once the swarm has been unable to finish
    (`invariants.why_unrecoverable`) for more than `settle_s`, TIME_LIMIT at `limit_s` (virtual)."""
    unrecoverable_since: float | None = None
    while virtual_now() < limit_s:
        await asyncio.sleep(poll_s)
        if on_poll is not None:
            on_poll()
        if any(h.finished for h in cluster.nodes.values()):
            return FINISHED
        if stop_on_crash and any(h.crash for h in cluster.nodes.values()):
            return CRASHED
        if inv.why_unrecoverable(cluster, num_stages) is None:
            unrecoverable_since = None
        elif unrecoverable_since is None:
            unrecoverable_since = virtual_now()
        elif virtual_now() - unrecoverable_since > settle_s:
            return UNRECOVERABLE
    return TIME_LIMIT
