"""The `checkpoint` baseline's rollback, driven by stage 0 before each step (docs/recovery.md): whenever a stage
changed hands since the last rollback, or this stage 0 is itself a replacement, every stage goes back to the
newest complete checkpoint.

One job: decide when to roll back and do it. It sees stage 0's node as a `copies.CopyHost` with a view.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cfnode.errors import PeerUnavailableError, RejectedError
from cfnode.node.routes import FIRST_GENERATION
from cfnode.recovery import copies, store

if TYPE_CHECKING:
    from cfnode.train.driver import DriverHost

logger = logging.getLogger(__name__)


class CheckpointRollback:
    def __init__(self, host: DriverHost) -> None:
        self.host = host
        self._owners: dict[int, tuple[str, int] | None] | None = None
        self._from: int | None = None

    def _ring_owners(self) -> dict[int, tuple[str, int] | None]:
        """Who holds each stage at which generation (a rebuild always bumps the generation, even when the same
        peer id comes back)."""
        view = self.host.view
        return {i: ((o.peer_id, o.record.generation) if (o := view.online_owner(i)) is not None else None)
                for i in range(1, self.host.config.model.num_stages + 1)}

    async def if_needed(self, last_attempt_id: int) -> bool:
        """`checkpoint` baseline: whenever a stage changed hands since the last rollback (a node was lost and
        replaced), or this stage 0 is itself a replacement, roll every stage back to the newest complete
        checkpoint. Returns False if the rollback failed (the caller waits for the ring and tries again)."""
        owners = self._ring_owners()
        if self._owners is None and self.host.generation <= FIRST_GENERATION:
            self._owners = owners  # the original stage 0 of a run: nothing was lost yet
            return True
        if owners == self._owners:
            return True
        assert self.host.worker is not None
        if self._from is None:
            self._from = self.host.worker.step
        to_step = store.latest_complete(copies.checkpoint_root(self.host))
        try:
            await copies.rollback_swarm(self.host, to_step, self._from, last_attempt_id)
        except (RejectedError, PeerUnavailableError) as e:
            logger.warning("rollback to the checkpoint of step %d failed (%s); retrying", to_step, e)
            await asyncio.sleep(self.host.config.train.retry_backoff_s)
            await self.host.refresh_view()
            return False
        self._owners, self._from = owners, None
        return True
