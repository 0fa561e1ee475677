"""The node's own record in the DHT: written every heartbeat period, at once when something changed
(`soon`), under the stage key the node holds or the standby key, with expirations that only ever move forward;
and the node's copy of the run's meta, kept alive alongside.

One job: keep what the node says about itself visible. It never reads the swarm (routes.py does) and decides
nothing: the node tells it what to say through `Seat`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from cfnode.clock import Clock
from cfnode.config import HeartbeatConfig
from cfnode.deadline import within
from cfnode.metrics import NodeMetrics
from cfnode.net.dht import SwarmStore
from cfnode.net.records import StageRecord

logger = logging.getLogger(__name__)
META_REFRESH_S = 60.0
EXPIRATION_STEP_S = 0.05


class Seat(Protocol):
    """What the node holds right now, as its record says it."""

    def record_key(self) -> int | None:
        """The stage key to write our record under (None: the standby key)."""
        ...

    def own_record(self) -> StageRecord: ...


class Announcer:
    def __init__(self, swarm: SwarmStore, clock: Clock, heartbeat: HeartbeatConfig, metrics: NodeMetrics,
                 seat: Seat, store_meta: Callable[[], Awaitable[None]]) -> None:
        self.swarm = swarm
        self.clock = clock
        self.heartbeat = heartbeat
        self.metrics = metrics
        self.seat = seat
        self._store_meta = store_meta
        self._now = asyncio.Event()
        self._meta_stored_at = clock.monotonic()
        self._expirations: dict[int | None, float] = {}
        """Per key, the latest expiration we wrote there (the DHT keeps the latest one it saw)."""

    def soon(self) -> None:
        """Announce now rather than at the next period (after a commit, a state change)."""
        self._now.set()

    async def run(self) -> None:
        """Announce every period; a failed store is retried after a quarter period, so a stuck call (bounded by
        the DHT call timeout, ttl/3) never lets the record expire. Survives any error."""
        period = self.heartbeat.period_s
        while True:
            started = self.clock.monotonic()
            wait = period
            try:
                await self.announce()
            except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any single failure
                self.metrics.loop_errors.labels(loop="heartbeat").inc()
                logger.warning("heartbeat store failed (%s: %s); retrying soon", type(e).__name__, e)
                wait = period / 4
            took = self.clock.monotonic() - started
            if took > period:
                logger.warning("heartbeat took %.2fs, longer than its period %.2fs", took, period)
            self._now.clear()
            try:
                # `within`, not wait_for: in 3.11 wait_for swallows a cancellation that arrives as the event is set
                await within(self._now.wait(), max(0.0, wait - took))
            except (TimeoutError, asyncio.TimeoutError):
                pass

    async def announce(self) -> None:
        """Write our record under the key we hold (and refresh our meta copy when it is due)."""
        if self.clock.monotonic() - self._meta_stored_at > META_REFRESH_S:
            await self._store_meta()  # keep {run}:meta alive for as long as the run has nodes
            self._meta_stored_at = self.clock.monotonic()
        await self.store(self.seat.record_key())
        self.metrics.last_announce.set(self.clock.time())

    async def store(self, stage: int | None, *, ttl_s: float | None = None) -> bool:
        """Write our record under `stage` (None: the standby key). Its expiration is always later than the last
        one we wrote there: the DHT refuses an earlier one, so after an OFFLINE written for ttl + 1 a plain
        heartbeat would silently not land."""
        ttl = self.heartbeat.ttl_s if ttl_s is None else ttl_s
        now = self.clock.time()
        ttl = max(ttl, self._expirations.get(stage, 0.0) - now + EXPIRATION_STEP_S)
        stored = await self.swarm.store_stage(stage, self.seat.own_record(), ttl_s=ttl)
        if stored:
            self._expirations[stage] = now + ttl
        else:
            logger.warning("the DHT refused our record for %s", "standby" if stage is None else f"stage {stage}")
        return stored
