"""Stage 0 waits for a complete ring: every transformer stage 1..L with a live owner, before each step."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Protocol

from cfnode.errors import PeerUnavailableError

if TYPE_CHECKING:
    from cfnode.clock import Clock
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.net.records import SwarmView
    from cfnode.train.worker import StageWorker

logger = logging.getLogger(__name__)

RING_POLL_S = 0.25
"""How often stage 0 reads the DHT while a stage has no live owner (a read costs a few ms of CPU)."""


class RingHost(Protocol):
    config: NodeConfig
    events: EventLog
    clock: Clock
    join_addr: str | None
    worker: StageWorker | None

    def route(self, stage_idx: int) -> str: ...
    async def refresh_view(self) -> SwarmView: ...


class RingWait:
    """`complete()` returns once every stage has a live owner; each stage's wait is logged once per loss."""

    def __init__(self, host: RingHost) -> None:
        self.host = host
        self._waiting_logged: set[int] = set()
        self._lost_logged_at: dict[int, float] = {}

    def missing_stages(self) -> list[int]:
        out = []
        for idx in range(1, self.host.config.model.num_stages + 1):
            try:
                self.host.route(idx)
            except PeerUnavailableError:
                out.append(idx)
        return out

    async def complete(self) -> None:
        """Poll the DHT every RING_POLL_S (or heartbeat period, if shorter) until the ring is complete: a rebuilt
        stage announces itself ONLINE at once, and every poll saved is downtime saved."""
        host, heartbeat = self.host, self.host.config.heartbeat
        while True:
            missing = self.missing_stages()
            if not missing:
                if self._waiting_logged:
                    host.events.emit("ring_complete")
                self._waiting_logged.clear()
                return
            for idx in missing:
                if idx not in self._waiting_logged:
                    self._waiting_logged.add(idx)
                    self._log_waiting(idx)
            await asyncio.sleep(min(RING_POLL_S, heartbeat.period_s))
            await host.refresh_view()

    def _log_waiting(self, idx: int) -> None:
        host = self.host
        addr = host.join_addr or "<addr>"
        if host.worker is not None and host.worker.step > 0:
            # One warning per loss: a new holder that flaps right after its rebuild (e.g. a libp2p dial backoff)
            # is the same incident, so it is only counted as an event.
            now = host.clock.monotonic()
            if now - self._lost_logged_at.get(idx, -math.inf) > 3 * host.config.heartbeat.ttl_s:
                logger.warning("stage %d lost; waiting for a node to rebuild it (cfnode join --peers %s)", idx, addr)
            self._lost_logged_at[idx] = now
        else:
            logger.info("stage %d has no node yet; waiting for one (cfnode join --peers %s)", idx, addr)
        host.events.emit("waiting_for_stage", stage=idx)
