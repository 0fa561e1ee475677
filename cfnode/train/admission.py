"""Stage 0's side of an exact join (docs/architecture.md "Stage groups"): a newcomer asks to enter a stage's
group (`rpc_admit`); at the next step boundary the driver answers with the step and the member to copy, and holds
the ring until the newcomer is ONLINE in the group at that step (or `join_timeout_s` passed). The newcomer copies
weights, Adam state and step from that member while nothing trains (node/join.py), so from the next step on it
is bit-identical to its group.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.errors import InvalidPayload
from cfnode.net.records import StageState

if TYPE_CHECKING:
    from cfnode.clock import Clock
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.metrics import NodeMetrics
    from cfnode.net.records import SwarmView
    from cfnode.node.routes import RouteTable

logger = logging.getLogger(__name__)


class AdmissionHost(Protocol):
    config: NodeConfig
    events: EventLog
    metrics: NodeMetrics
    clock: Clock
    routes: RouteTable

    @property
    def view(self) -> SwarmView: ...
    async def refresh_view(self) -> SwarmView: ...


class Admissions:
    def __init__(self, host: AdmissionHost) -> None:
        self.host = host
        self._pending: list[tuple[str, int, asyncio.Future[dict[str, Any]]]] = []

    def _refusal(self, peer_id: str, stage: int, generation: int) -> str | None:
        cfg, view = self.host.config, self.host.view
        if cfg.group.replicas <= 1:
            return "this run holds one peer per stage (--replicas 1)"
        if not 0 <= stage <= cfg.model.num_stages:
            return f"stage {stage} is not a stage of this run (0..{cfg.model.num_stages})"
        group = view.group(stage)
        if not group:
            return f"stage {stage} has no live member to copy"
        if any(p.peer_id == peer_id for p in group):
            return f"{peer_id[:12]} is a member of stage {stage} already"
        if len(group) >= cfg.group.replicas:
            return f"stage {stage}'s group is full ({len(group)} of {cfg.group.replicas})"
        if group[0].record.generation != generation:
            return f"stage {stage}'s group is at generation {group[0].record.generation}, not {generation}"
        return None

    async def request(self, peer_id: str, stage: int, generation: int) -> dict[str, Any]:
        """rpc_admit: answered at the next step boundary with {step, source, generation}."""
        if not await self.host.routes.is_member(peer_id):
            raise InvalidPayload("unauthorized", "only a peer with a record in this run may join a group")
        if (why := self._refusal(peer_id, stage, generation)) is not None:
            raise InvalidPayload("admission", why)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((peer_id, stage, fut))
        return await fut

    async def serve(self, step: int) -> None:
        """At a step boundary: let every waiting newcomer in, one at a time."""
        while self._pending:
            peer_id, stage, fut = self._pending.pop(0)
            if fut.done():  # the newcomer gave up (its RPC timed out)
                continue
            view = await self.host.refresh_view()
            group = view.group(stage)
            generation = group[0].record.generation if group else -1  # the group may have been rebuilt meanwhile
            why = self._refusal(peer_id, stage, generation)
            members = self.host.routes.members(stage)
            if why is None and not members:
                why = f"stage {stage} has no live member to copy"
            if why is not None:
                fut.set_exception(InvalidPayload("admission", why))
                continue
            source = members[0][0]
            fut.set_result({"step": step, "source": source, "generation": generation})
            await self._hold_until_joined(peer_id, stage, step, source)

    async def _hold_until_joined(self, peer_id: str, stage: int, step: int, source: str) -> None:
        host = self.host
        timeout = host.config.group.join_timeout_s
        deadline = host.clock.monotonic() + timeout
        logger.info("holding the ring at step %d while %s copies stage %d from %s", step, peer_id[:12], stage,
                    source[:12])
        while host.clock.monotonic() < deadline:
            await asyncio.sleep(min(0.25, host.config.heartbeat.period_s / 4))
            view = await host.refresh_view()
            joined = next((p for p in view.group(stage) if p.peer_id == peer_id), None)
            if joined is not None and joined.record.step == step:
                host.metrics.group_joins.labels(role="admitted").inc()
                host.events.emit("member_admitted", stage=stage, peer=peer_id[:12], source=source[:12], step=step)
                return
            if not any(p.peer_id == peer_id and p.record.state is not StageState.OFFLINE
                       for p in view.members(stage)):
                break  # the newcomer gave up (its record is gone or OFFLINE)
        host.metrics.group_joins.labels(role="timed_out").inc()
        host.events.emit("member_admission_timed_out", stage=stage, peer=peer_id[:12], step=step)
        logger.warning("%s did not join stage %d within %.0fs; training on without it", peer_id[:12], stage, timeout)
