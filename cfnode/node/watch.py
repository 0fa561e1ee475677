"""What each membership read tells a node: step down when the view says our stage is somebody else's (one owner
per stage; in groups, a higher generation or a founder that outranks us: net/groups.py), a neighbour lost or back, and stage 0 gone for good (only after its last holder fails a
ping: a read that merely missed its record is not a loss).

One job: react to views. `Watch` keeps what it has noticed (neighbours seen, losses logged); it sees the node
through `WatchHost`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from cfnode.errors import UnrecoverableError
from cfnode.net.groups import stage_to_move_to, step_down_reason
from cfnode.net.records import StageState, SwarmView, is_occupied, swarm_has_trained
from cfnode.recovery.replicas import replica_targets
from cfnode.train.schedule import next_stage, prev_stage

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.metrics import NodeMetrics

logger = logging.getLogger(__name__)


class WatchHost(Protocol):
    config: NodeConfig
    events: EventLog
    metrics: NodeMetrics
    peer_id: str
    stage: int | None
    state: StageState
    generation: int
    joined_from: str

    def fence(self) -> None: ...
    async def is_reachable(self, peer_id: str) -> bool: ...


def copy_holders(view: SwarmView, stage: int, num_stages: int, mode: str) -> set[int]:
    """Live stages that keep a copy of `stage` (recovery/replicas.py) and report holding one."""
    return {i for i in replica_targets(stage, num_stages, mode)
            if (o := view.online_owner(i)) is not None and o.record.replica_step >= 0}


def stage0_recoverable(view: SwarmView, num_stages: int, mode: str) -> bool:
    """Stage 0 can be rebuilt: from a live copy (checkfree+, redundant) or from the checkpoint store."""
    return mode == "checkpoint" or bool(copy_holders(view, 0, num_stages, mode))


def stage0_lost(view: SwarmView, num_stages: int, mode: str, start_step: int = 0) -> bool:
    """Stage 0 is gone from a swarm that had trained, and nothing can rebuild it."""
    return (view.online_owner(0) is None and not is_occupied(view.members(0), view.now)
            and swarm_has_trained(view, num_stages, start_step) and not stage0_recoverable(view, num_stages, mode))


class Watch:
    def __init__(self, host: WatchHost) -> None:
        self.host = host
        self.seen_neighbours: set[int] = set()
        """Neighbour stages seen ONLINE since this node went ONLINE."""
        self.lost_neighbours: set[int] = set()
        self.unrecoverable_logged = False
        self.last_stage0_peer: str | None = None

    def reset(self) -> None:
        """A new stage (or the same one again): what we noticed about the old one's neighbours is void."""
        self.seen_neighbours.clear()
        self.lost_neighbours.clear()

    async def on_view(self, view: SwarmView) -> None:
        """What a stage holder learns from each membership read (our own record is always in `view`)."""
        host = self.host
        if (owner0 := view.online_owner(0)) is not None:
            self.last_stage0_peer = owner0.peer_id
        await self.confirm_unrecoverable(view)
        stage = host.stage
        if stage is None or host.state is not StageState.ONLINE:
            return
        why = step_down_reason(view, stage, host.peer_id, host.generation, joined_from=host.joined_from,
                               replicas=host.config.group.replicas)
        if why is not None:  # whoever outranks us: one owner per stage, one founder per group generation
            owner = view.online_owner(stage)
            logger.warning("stage %d is now %s (ours: generation %d); stepping down to STANDBY", stage, why,
                           host.generation)
            host.events.emit("fenced", stage=stage, by=owner.peer_id[:12] if owner else "",
                             generation=owner.record.generation if owner else host.generation, why=why)
            host.fence()
            return
        num = host.config.model.num_stages
        target = None if host.config.stage is not None else stage_to_move_to(  # a pinned member stays
            view, num, stage, host.peer_id, replicas=host.config.group.replicas,
            start_step=host.config.train.start_step)
        if target is not None:
            logger.warning("stage %d's group is empty and no spare waits: leaving stage %d's group to rebuild it",
                           target, stage)
            host.events.emit("rebalancing", stage=stage, to_stage=target)
            host.fence()
            return
        for side, idx in (("prev", prev_stage(stage, num)), ("next", next_stage(stage, num))):
            alive = view.online_owner(idx) is not None
            if alive:
                self.seen_neighbours.add(idx)
            # One detection per incident: a neighbour seen ONLINE since we went ONLINE now has no live owner (a
            # stage that never had one, e.g. at start-up, is not a failure; failed hops are counted elsewhere).
            if not alive and idx in self.seen_neighbours and idx not in self.lost_neighbours:
                self.lost_neighbours.add(idx)
                left = any(p.record.state is StageState.OFFLINE for p in view.members(idx))
                host.metrics.stage_failures_detected.labels(neighbor=side).inc()
                host.events.emit("neighbour_lost", stage=idx, side=side, how="left" if left else "expired")
                logger.warning("neighbour stage %d (%s) has no live owner (%s)", idx, side,
                               "it left: OFFLINE record" if left else "its heartbeat record expired")
            elif alive and idx in self.lost_neighbours:
                self.lost_neighbours.discard(idx)
                host.events.emit("neighbour_back", stage=idx, side=side)

    async def confirm_unrecoverable(self, view: SwarmView) -> None:
        """Log once (and export) that stage 0 is gone for good, but only after its last known holder fails a
        ping: a read that merely missed its record (a slow DHT) is not a loss."""
        host = self.host
        num, mode = host.config.model.num_stages, host.config.recovery.mode
        if not stage0_lost(view, num, mode, host.config.train.start_step):
            host.metrics.unrecoverable.set(0)
            self.unrecoverable_logged = False
            return
        if self.unrecoverable_logged:
            return
        last = self.last_stage0_peer
        if last is not None and await host.is_reachable(last):
            logger.info("stage 0's record is missing from the view but its holder %s answers; not a loss", last[:12])
            return
        self.note_unrecoverable(view)

    def note_unrecoverable(self, view: SwarmView) -> None:
        """Log once (and export) that stage 0 is gone from a swarm that had trained."""
        host = self.host
        num, mode = host.config.model.num_stages, host.config.recovery.mode
        lost = stage0_lost(view, num, mode, host.config.train.start_step)
        host.metrics.unrecoverable.set(1 if lost else 0)
        if lost and not self.unrecoverable_logged:
            self.unrecoverable_logged = True
            left = any(p.record.state is StageState.OFFLINE for p in view.members(0))
            has_copies = bool(replica_targets(0, num, mode))
            why = "no live stage holds a copy of it" if has_copies else "it cannot be rebuilt without checkfree+"
            err = UnrecoverableError(
                f"stage 0 (embedding, final norm, LM head) {'left the run' if left else 'was lost'} and {why}; "
                "training is paused for good")
            logger.log(logging.WARNING if left else logging.ERROR, "%s", err)
            host.events.emit("unrecoverable", stage=0,
                             reason="stage 0 lost; no live copy" if has_copies else "stage 0 lost; needs checkfree+")
            host.metrics.recoveries.labels(role="recovered", rule=host.config.recovery.rule,
                                           result="unrecoverable").inc()
        elif not lost:
            self.unrecoverable_logged = False
