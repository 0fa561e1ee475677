"""Stage 0's fast path for lost members (docs/groups.md "Losing members"): the members failed hops and commit
calls pointed at are pinged (banned if silent); once every member of a group failed its ping, the group is
reported lost in stage 0's record (`StageRecord.lost`) for one ttl at most, so that a spare claims the stage
before the records expire.

One job: which members are dead and which groups are lost. It sees stage 0's node through `SuspectsHost`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from cfnode.net.records import StageState

if TYPE_CHECKING:
    from cfnode.clock import Clock
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.net.records import SwarmView
    from cfnode.node.routes import RouteTable
    from cfnode.train.commit import StepCommit
    from cfnode.train.paths import AttemptPaths

logger = logging.getLogger(__name__)


class SuspectsHost(Protocol):
    config: NodeConfig
    clock: Clock
    events: EventLog
    routes: RouteTable

    @property
    def view(self) -> SwarmView: ...
    async def confirm_suspect(self, peer: str) -> bool: ...
    def heartbeat_soon(self) -> None: ...


class Suspects:
    def __init__(self, host: SuspectsHost, paths: AttemptPaths, commit: StepCommit) -> None:
        self.host = host
        self.paths = paths
        self.commit = commit
        self._suspects: list[str] = []
        """Members a failed hop pointed at: pinged (and banned if dead) before the attempt is retried."""
        self._dead: set[str] = set()
        """Members a ping confirmed dead."""
        self._lost: dict[int, tuple[int, float]] = {}
        """Stage -> (generation, when) of a group whose every member is in `_dead`: published in stage 0's record
        for one ttl at most (by then the records of a group truly lost have expired; a false alarm ends)."""

    def add(self, peer: str) -> None:
        if peer not in self._suspects:
            self._suspects.append(peer)

    def pending(self) -> bool:
        return bool(self._suspects or self.commit.suspects)

    async def confirm(self) -> bool:
        """Ping the members failed hops and commit calls pointed at; True if one was dead and its stage still has
        a live member (the retry goes around it without waiting)."""
        rerouted = False
        suspects, self._suspects = self._suspects, []
        suspects += [p for p in self.commit.suspects if p not in suspects]
        self.commit.suspects.clear()
        for peer in suspects:
            if await self.host.confirm_suspect(peer):
                self._dead.add(peer)
                stage = next((i for i, ms in self.paths.participants.items() if peer in ms), None)
                if stage is None:
                    continue
                rerouted |= any(p != peer for p, _ in self.host.routes.members(stage))
                self._note_if_lost(stage)
        return rerouted

    def note_dead(self, peer: str, stage: int) -> None:
        """A member confirmed dead (pinged) while the attempt went on around it."""
        self._dead.add(peer)
        self._note_if_lost(stage)

    def _note_if_lost(self, stage: int) -> None:
        """Once every member of a stage's group failed a ping, say so in stage 0's record."""
        group = self.host.view.group(stage)
        if group and all(p.peer_id in self._dead for p in group):
            generation = group[0].record.generation
            if self._lost.get(stage, (-1, 0.0))[0] < generation:
                self._lost[stage] = (generation, self.host.clock.monotonic())
                logger.warning("every member of stage %d's group failed a ping: reporting it lost", stage)
                self.host.events.emit("group_lost", stage=stage, generation=generation,
                                      members=[p.peer_id[:12] for p in group])
                self.host.heartbeat_soon()

    def lost_groups(self) -> tuple[tuple[int, int], ...]:
        """(stage, generation) of the groups confirmed lost whose stage has not been rebuilt since."""
        view = self.host.routes.last_read  # as read, not filtered by this very report
        now = self.host.clock.monotonic()
        for stage, (generation, since) in list(self._lost.items()):
            rebuilt = any(p.record.generation > generation and p.record.state is StageState.ONLINE
                          for p in view.members(stage))
            expired = not any(p.record.generation <= generation for p in view.members(stage))
            if rebuilt or expired or now - since > self.host.config.heartbeat.ttl_s:  # done, or a false alarm
                del self._lost[stage]
                self._dead.difference_update(p.peer_id for p in view.members(stage))
        return tuple(sorted((stage, generation) for stage, (generation, _) in self._lost.items()))
