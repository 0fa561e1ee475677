"""A stage group's gradient all-reduce: hivemind's `DecentralizedAverager` over one flat float64 buffer per group
size, prefix per run and stage (docs/architecture.md "Stage groups").

Every member of a group puts its summed gradient of the step, divided by the samples (microbatches) it processed,
into the buffer and averages it weighted by those samples; times the step's samples that is the group's summed
gradient, which the one-peer stage would have accumulated alone. hivemind hands each member `local + (average -
local)`, which in float32 differs between members in ~20 % of elements (bench/group_averaging.py); in float64
with float32 inputs the members' results round to the same float32 (the bench found no element that differs).
A second round on the rounded float32 values makes any remaining difference vanish: it averages values within
one float32 ulp of each other, and for those hivemind's subtraction and addition are exact. The driver asks for
it when the members' gradient digests disagree (train/driver.py).

One job: average a vector with exactly the peers the driver named for the step, or raise `AveragingError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from cfnode.errors import CfnodeError

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0


class AveragingError(CfnodeError):
    """The group's all-reduce did not complete with exactly the expected members."""


class GroupAverager(Protocol):
    async def average(self, vector: torch.Tensor, *, weight: float, group: Sequence[str],
                      tag: tuple[int, int]) -> torch.Tensor: ...
    async def warm(self, group_size: int) -> None:
        """Be ready to average in groups of `group_size` (a newcomer, before its first step)."""
    def close(self) -> None: ...


class AveragerFactory(Protocol):
    """Makes a stage's all-reduce: `HivemindAverager.over(dht)` on a real node, an in-memory one in the protocol
    harness (cfnode/testing/)."""

    def __call__(self, *, prefix: str, size: int, timeout_s: float, matchmaking_s: float,
                 own_peer: str) -> GroupAverager: ...


def averaging_prefix(run_id: str, stage_idx: int) -> str:
    """hivemind's averaging key prefix of a stage's group in a run (no dots allowed)."""
    return "cfnode_" + re.sub(r"[^A-Za-z0-9_-]", "_", run_id) + f"_stage{stage_idx}"


def check_gathered(gathered: dict[str, Any], group: Sequence[str], tag: tuple[int, int]) -> None:
    """Members exchange (peer, step, attempt) with the tensors: the round must have had exactly `group`, all at
    the same attempt, or the result is someone else's average."""
    peers = sorted(str(g.get("peer")) for g in gathered.values() if isinstance(g, dict))
    tags = {(g.get("step"), g.get("attempt")) for g in gathered.values() if isinstance(g, dict)}
    if peers != sorted(group) or tags != {tag}:
        raise AveragingError(f"averaged with {[p[:12] for p in peers]} at {sorted(map(str, tags))}, expected "
                             f"{[p[:12] for p in sorted(group)]} at {tag}")


def _exit_when_parent_dies(parent_pid: int, poll_s: float = 0.5) -> None:
    """Inside the averager's process: a `kill -9` of the node must not leave it running."""

    def watch() -> None:
        import time

        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="cfnode-averager-watchdog", daemon=True).start()


class HivemindAverager:
    """One `DecentralizedAverager` (a forked process sharing the DHT's p2pd) per group size seen, created on first
    use; `target_group_size = min_group_size = ` that size, so a round starts as soon as the whole group is in."""

    def __init__(self, dht: Any, *, prefix: str, size: int, timeout_s: float, matchmaking_s: float,
                 own_peer: str) -> None:
        self.dht, self.prefix, self.size = dht, prefix, size
        self.timeout_s, self.matchmaking_s, self.own_peer = timeout_s, matchmaking_s, own_peer
        self._by_size: dict[int, Any] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def over(cls, dht: Any) -> AveragerFactory:
        """The factory of a node whose swarm runs over `dht` (a hivemind.DHT)."""

        def make(*, prefix: str, size: int, timeout_s: float, matchmaking_s: float, own_peer: str) -> GroupAverager:
            return cls(dht, prefix=prefix, size=size, timeout_s=timeout_s, matchmaking_s=matchmaking_s,
                       own_peer=own_peer)

        return make

    async def _averager(self, group_size: int) -> Any:
        async with self._lock:
            if group_size not in self._by_size:
                self._by_size[group_size] = await asyncio.to_thread(self._create, group_size)
            return self._by_size[group_size]

    def _create(self, group_size: int) -> Any:
        from hivemind.averaging import DecentralizedAverager

        parent = os.getpid()

        class _Averager(DecentralizedAverager):  # type: ignore[misc]
            def run(self) -> None:
                _exit_when_parent_dies(parent)
                super().run()

        logger.info("starting the all-reduce of %s for groups of %d (%d values)", self.prefix, group_size, self.size)
        averager = _Averager([torch.zeros(self.size, dtype=torch.float64)], self.dht, start=False,
                             prefix=f"{self.prefix}_g{group_size}", target_group_size=group_size,
                             min_group_size=group_size, min_matchmaking_time=self.matchmaking_s,
                             request_timeout=max(0.1, self.matchmaking_s / 2), allreduce_timeout=self.timeout_s,
                             next_chunk_timeout=self.timeout_s, declare_state_period=3600.0)
        # Not `start=True`: hivemind's run_in_background sets SIGINT to SIG_IGN in *our* process for good (and
        # needs the main thread); the node's own SIGINT/SIGTERM handling must stay.
        averager.start()
        averager.wait_until_ready(START_TIMEOUT_S)
        return averager

    async def warm(self, group_size: int) -> None:
        """Start the averager for groups of `group_size` now (its process takes seconds to come up): a newcomer
        does it before it asks to be admitted, so its first all-reduce does not miss the round."""
        await self._averager(group_size)

    async def average(self, vector: torch.Tensor, *, weight: float, group: Sequence[str],
                      tag: tuple[int, int]) -> torch.Tensor:
        averager = await self._averager(len(group))

        def run() -> torch.Tensor:
            with averager.get_tensors() as (buf,):
                buf.copy_(vector)
            try:
                gathered = averager.step(gather={"peer": self.own_peer, "step": tag[0], "attempt": tag[1]},
                                         weight=float(weight), timeout=self.timeout_s, allow_retries=False)
            except Exception as e:
                raise AveragingError(f"all-reduce with {len(group)} members failed: {type(e).__name__}: {e}") from e
            if gathered is None:
                raise AveragingError(f"no all-reduce round with {len(group)} members within {self.timeout_s:g} s")
            check_gathered({str(k): v for k, v in gathered.items()}, group, tag)
            with averager.get_tensors() as (buf,):
                return buf.clone()

        return await asyncio.to_thread(run)

    def close(self) -> None:
        for averager in self._by_size.values():
            try:
                averager.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.debug("averager shutdown: %s", e)
        self._by_size.clear()
