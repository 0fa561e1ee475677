"""The node's picture of the swarm: the last view (merged over reads, so an incomplete read is not a loss),
the generation memory (generations never repeat for a stage), bans, routing to a stage's owner and the
sender checks of incoming messages.

One job: turn DHT reads into "who owns what"; it never writes. The node, its hop handling, the claim protocol
and the driver see it through its methods.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cfnode.clock import Clock
from cfnode.config import HeartbeatConfig
from cfnode.errors import InvalidPayload, PeerUnavailableError
from cfnode.metrics import NodeMetrics
from cfnode.net.dht import SwarmStore
from cfnode.net.groups import without_confirmed_lost
from cfnode.net.records import (
    PeerRecord,
    SwarmView,
    bound_generations,
    learn_generations,
    merge_views,
    with_own_record,
)

logger = logging.getLogger(__name__)
FIRST_GENERATION = 1
"""The generation of a stage's first holder: `next_generation` of a stage nobody ever held."""
SENDER_RECHECK_S = 0.3
"""An unknown sender waits for a fresh read at most this long (a new member may have come online)."""


class RouteTable:
    def __init__(self, swarm: SwarmStore, clock: Clock, heartbeat: HeartbeatConfig, metrics: NodeMetrics,
                 num_stages: int, own: Callable[[], tuple[int | None, PeerRecord | None]]) -> None:
        self.swarm = swarm
        self.clock = clock
        self.heartbeat = heartbeat
        self.metrics = metrics
        self.num_stages = num_stages
        self._own = own
        """(stage, our record as a PeerRecord) or (None, None): our own record always counts in our view."""
        self.view = SwarmView()
        self.generations: dict[int, int] = {}
        """Highest generation known per stage (from every record ever read, and the owners' memories)."""
        self.banned: dict[str, float] = {}
        self.refreshed_at = -1e9
        self.last_read = SwarmView()
        """The last read as it came (bounded, not merged, without our own record injected): whether the DHT
        returned our own record tells a claimant that the read was complete for its stage."""
        self.failed_reads = 0

    # -- reading -----------------------------------------------------------------------------------------

    async def refresh(self) -> SwarmView:
        """A fresh read, merged into what we knew; raises on a DHT error (see `refresh_or_keep`)."""
        fresh = await self.swarm.read_view()
        bounded, dropped = bound_generations(fresh, self.generations)
        for p in dropped:
            self.metrics.dht_records_dropped.labels(reason="generation").inc()
            logger.warning("ignored a record of %s claiming generation %d (known: %d): out of bounds",
                           p.peer_id[:12], p.record.generation, self.generations.get(_stage_of(fresh, p), 0))
        self.last_read = bounded
        self.view = without_confirmed_lost(merge_views(self.view, bounded))
        stage, mine = self._own()
        if mine is not None:
            self.view = with_own_record(self.view, stage, mine)
            self.generations[stage] = max(self.generations.get(stage, 0), mine.record.generation)  # type: ignore[index]
        self.generations = learn_generations(self.view, self.generations)
        self.refreshed_at = self.clock.monotonic()
        now = self.clock.time()
        self.banned = {p: t for p, t in self.banned.items() if t > now}
        online = sum(1 for i in range(self.num_stages + 1) if self.view.online_owner(i) is not None)
        self.metrics.swarm_stages_online.set(online)
        for i in range(self.num_stages + 1):
            self.metrics.group_members.labels(stage=str(i)).set(len(self.view.group(i)))
        self.metrics.swarm_standby.set(len(self.view.standby))
        return self.view

    async def refresh_or_keep(self) -> SwarmView:
        """A fresh read if the DHT answers, else the view we had (the error is logged and counted): a slow or
        failing DHT must not take a node down, and a failed read says nothing about who is alive."""
        try:
            return await self.refresh()
        except Exception as e:  # noqa: BLE001 - any DHT failure: keep serving on what we knew
            self.failed_reads += 1
            self.metrics.loop_errors.labels(loop="dht_read").inc()
            logger.warning("DHT read failed (%s: %s); keeping the previous view", type(e).__name__, e)
            return self.view

    def next_generation(self, stage_idx: int) -> int:
        """A generation never used for this stage as far as the swarm remembers."""
        return max(self.generations.get(stage_idx, 0), self.view.max_generation(stage_idx), FIRST_GENERATION - 1) + 1

    # -- routing -----------------------------------------------------------------------------------------

    def owner(self, stage_idx: int) -> PeerRecord | None:
        return self.view.online_owner(stage_idx)

    def route(self, stage_idx: int) -> str:
        """The first live member of a stage's group (its owner, with one peer per stage), or
        PeerUnavailableError."""
        members = self.members(stage_idx)
        if not members:
            raise PeerUnavailableError(f"stage {stage_idx} has no live owner")
        return members[0][0]

    def members(self, stage_idx: int) -> list[tuple[str, float]]:
        """The stage group's members that are not banned, as (peer id, throughput), the lead first."""
        now = self.clock.time()
        return [(p.peer_id, p.record.throughput) for p in self.view.group(stage_idx)
                if self.banned.get(p.peer_id, 0) <= now]

    def is_banned(self, peer_id: str) -> bool:
        return self.banned.get(peer_id, 0) > self.clock.time()

    def ban(self, peer_id: str, reason: str) -> None:
        """Stop routing to a peer until its current record would expire, and for at least one ttl from now (a
        stale cached read can still list a dead peer's last record for a while after its expiry), plus one period,
        so the view has dropped it by then."""
        expiry = self.heartbeat.period_s + max(
            [p.expiration_time for ps in self.view.stages.values() for p in ps if p.peer_id == peer_id]
            + [self.clock.time() + self.heartbeat.ttl_s])
        if self.banned.get(peer_id, 0) < expiry:
            self.banned[peer_id] = expiry
            self.metrics.peer_bans.labels(reason=reason).inc()

    def knows(self, peer_id: str) -> bool:
        """A live member of the run: some stage record or a spare's."""
        return any(p.peer_id == peer_id for ps in self.view.stages.values() for p in ps) or any(
            p.peer_id == peer_id for p in self.view.standby)

    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None:
        """The sender must be an ONLINE member of `stage_idx`'s group (its owner, with one peer per stage) with
        the generation it claims."""
        member = _member(self.view, stage_idx, peer_id)
        if member is None:
            await self._recheck()
            member = _member(self.view, stage_idx, peer_id)
        if member is None:
            raise InvalidPayload("unauthorized", f"sender is not the ONLINE owner of stage {stage_idx}")
        if member.record.generation != generation:
            raise InvalidPayload("generation", f"sender claims generation {generation}, its record says "
                                               f"{member.record.generation}")

    async def is_member(self, peer_id: str) -> bool:
        """`knows`, re-reading the DHT (rate-limited) for a peer we have not seen yet (a fresh claimant)."""
        if not self.knows(peer_id):
            await self._recheck()
        return self.knows(peer_id)

    async def _recheck(self) -> None:
        """One fresh read for an unknown sender, after at most SENDER_RECHECK_S: a member that has just come
        online (an exact join, a claimant) sends before our last read could list it, so rejecting it at once
        would abort the step it is in; senders that wait together share the read the first of them makes."""
        wait = SENDER_RECHECK_S - (self.clock.monotonic() - self.refreshed_at)
        if wait > 0:
            asked = self.refreshed_at
            await asyncio.sleep(wait)
            if self.refreshed_at != asked:
                return  # someone else read while we waited
        await self.refresh_or_keep()


def _member(view: SwarmView, stage_idx: int, peer_id: str) -> PeerRecord | None:
    return next((p for p in view.group(stage_idx) if p.peer_id == peer_id), None)


def _stage_of(view: SwarmView, record: PeerRecord) -> int:
    return next((i for i, ps in view.stages.items() if record in ps), -1)
