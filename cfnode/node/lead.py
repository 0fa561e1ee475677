"""Stage 0's lead (docs/groups.md "Stage 0's group"): the first unbanned member of stage 0's group drives (its
founder while it lives); a follower averages and applies every step like any member and takes over when the lead
is gone from its view. The lead also takes the other stages' abort reports and pings the members they point at.

One job: who drives, and what the driver hears from the stages. It sees the node through `LeadHost`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.errors import InvalidPayload, PeerUnavailableError
from cfnode.net.records import StageState
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.net.records import SwarmView
    from cfnode.node.routes import RouteTable

logger = logging.getLogger(__name__)


class LeadHost(Protocol):
    config: NodeConfig
    events: EventLog
    routes: RouteTable
    peer_id: str
    stage: int | None
    state: StageState
    generation: int
    joined_from: str
    worker: StageWorker | None
    driver: Any
    driving: bool

    @property
    def view(self) -> SwarmView: ...
    def heartbeat_soon(self) -> None: ...
    def last_attempt_seen(self) -> int: ...
    def ban(self, peer_id: str, reason: str) -> None: ...
    async def is_reachable(self, peer_id: str) -> bool: ...


class Stage0Lead:
    def __init__(self, host: LeadHost) -> None:
        self.host = host
        self.leading = asyncio.Event()
        """Set once the membership loop finds us leading stage 0's group."""

    def reset(self) -> None:
        self.leading.clear()

    def leads(self) -> bool:
        """We hold stage 0 and are the first unbanned member of its group in our view: its lead, the driver."""
        host = self.host
        members = host.routes.members(0)
        return (host.stage == 0 and host.state is StageState.ONLINE and bool(members)
                and members[0][0] == host.peer_id)

    def on_view(self) -> None:
        if self.leads():
            self.leading.set()

    async def drive_once_leading(self) -> None:
        """Drive stage 0 once we lead its group. A follower takes over at the step it holds, as the group's
        founder from then on (a later member's smaller id does not outrank it), its attempts outranking the last
        one it saw by far (`Driver.take_over`); at --max-steps the run is over and it only serves (the lead exported the model)."""
        host = self.host
        if not self.leads():
            await self.leading.wait()
        worker = host.worker
        assert host.driver is not None and worker is not None
        if host.joined_from:
            logger.warning("stage 0's lead is gone; this member of its group takes over at step %d", worker.step)
            host.events.emit("stage0_takeover", step=worker.step, generation=host.generation)
            host.joined_from = ""
            host.driver.take_over(host.last_attempt_seen())
            host.heartbeat_soon()
            max_steps = host.config.train.max_steps
            if max_steps is not None and worker.step >= max_steps:
                logger.info("the run reached --max-steps %d; serving stage 0 without driving", max_steps)
                await asyncio.Event().wait()
        host.driving = True
        await host.driver.run()

    async def accept_abort(self, meta: dict[str, Any]) -> None:
        """rpc_abort: a stage says the attempt cannot complete, which stage (and member) it could not reach, and
        the attempt it holds (the next one outranks it)."""
        host = self.host
        if host.stage != 0 or host.driver is None:
            raise InvalidPayload("wrong_stage", "only stage 0 takes abort reports")
        holds = meta.get("holds")
        if isinstance(holds, list) and len(holds) == 2 and all(type(h) is int for h in holds):
            host.driver.adopt((holds[0], holds[1]))
        suspect = meta.get("suspect_stage")
        suspect_peer = meta.get("suspect_peer") or None
        if not isinstance(suspect_peer, str) or len(suspect_peer) > 128:
            suspect_peer = None
        if suspect == 0:  # a follower of stage 0's group a microbatch ended at (never we, the lead)
            if suspect_peer == host.peer_id:
                suspect_peer = None
        elif isinstance(suspect, int) and 0 < suspect <= host.config.model.num_stages:
            if suspect_peer is None:
                try:
                    suspect_peer = host.routes.route(suspect)
                except PeerUnavailableError:
                    suspect_peer = None
        else:
            suspect_peer = None
        host.driver.fail_attempt(AttemptKey(meta["step"], meta["attempt"]), "reported",
                                 f"stage {meta['from_stage']}: {meta['reason']}", suspect=suspect_peer)

    async def confirm_suspect(self, peer: str) -> bool:
        """A peer could not reach `peer`: ping it ourselves; ban it if silent, so the driver routes around it (a
        stage group's other members) or waits for the ring instead of retrying into a dead peer until its record
        expires. True if it is dead."""
        host = self.host
        if await host.is_reachable(peer):
            return False
        host.ban(peer, "confirmed_dead")
        stage = next((i for i, ps in host.view.stages.items() if any(p.peer_id == peer for p in ps)), -1)
        host.events.emit("neighbour_unreachable", stage=stage, peer=peer[:12], confirmed_by="ping")
        return True
