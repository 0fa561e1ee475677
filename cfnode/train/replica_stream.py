"""CheckFree+: stage 0 streams its weights to the stage-0 replica holders (stages 1 and L) after each commit,
off the step's critical path and to one holder per step in turn (`recovery/replicas.py`, `replica_turn`). At a
hold and at the end of the run every holder is brought to the last step. Policy and bounds: docs/recovery.md,
"Stage-0 replicas and their freshness policy".
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.errors import PeerUnavailableError
from cfnode.recovery import copies
from cfnode.recovery.replicas import replica_targets, replica_turn

if TYPE_CHECKING:
    import torch

    from cfnode.net.records import SwarmView

logger = logging.getLogger(__name__)

CATCH_UP_TRIES = 2
"""Tries of the push that brings every holder to the last step; only an unreachable holder (a stream cut short,
seen with hivemind under load) is tried again, a refusal is not."""


class ReplicaHost(copies.CopyHost, Protocol):
    async def refresh_view(self) -> SwarmView: ...


class ReplicaStream:
    """At most one push in flight; the next waits for it, so a holder never gets steps out of order."""

    def __init__(self, host: ReplicaHost) -> None:
        self.host = host
        cfg = host.config
        self.holders = replica_targets(0, cfg.model.num_stages, cfg.recovery.mode)
        self.reached: dict[int, int] = {}
        """Holder -> the last step whose copy it confirmed."""
        self._push: asyncio.Future[list[tuple[int, BaseException]]] | None = None
        self._pushing: tuple[int, tuple[int, ...]] = (-1, ())
        """(step, holders) of the push in flight."""
        self._last_turn: int | None = None

    def start(self, state: dict[str, torch.Tensor], meta: dict[str, Any], peers: dict[int, str] | None,
              to: tuple[int, ...] | None = None) -> None:
        """Stream `state` (stage 0 as of its step `meta["step"]`) to `to` (default: the next holder in turn) in
        the background. Call `delivered` first: the previous push must be over."""
        assert self._push is None, "a replica push is still in flight"
        if to is None:
            to = replica_turn(0, self.host.config.model.num_stages, self.host.config.recovery.mode,
                              self._last_turn)
            self._last_turn = to[0] if to else None
        self._pushing = (int(meta["step"]), to)
        self._push = asyncio.ensure_future(copies.push_copies(self.host, state, meta, peers, to=to))

    async def delivered(self) -> dict[int, BaseException]:
        """Wait for the push in flight (if any); returns the holders it did not reach, with why (each also
        logged as `replica_failed`). A failed copy never fails a step."""
        push, self._push = self._push, None
        if push is None:
            return {}
        step, to = self._pushing
        try:
            failed = dict(await push)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a lost copy never fails the step that follows it
            logger.warning("the replica push of stage 0 failed: %s: %s", type(e).__name__, e)
            self.host.metrics.loop_errors.labels(loop="driver").inc()
            failed = dict.fromkeys(to, e)
        for idx in to:
            if idx not in failed:
                self.reached[idx] = step
        return failed

    async def catch_up(self) -> None:
        """A hold, the end of the run: every holder gets stage 0 as of its last step (those whose turn it was
        not, those a push missed, all of them after a skipped step)."""
        await self.delivered()
        worker = self.host.worker
        if not self.holders or worker is None:
            return
        rest = tuple(i for i in self.holders if self.reached.get(i) != worker.step)
        if not rest:
            return
        state = await self.host.compute(worker.snapshot)  # nothing was applied since the last commit: exact
        meta = copies.replica_meta(self.host, step=worker.step, grad_norm=worker.grad_norm,
                                   grad_norm_raw=worker.grad_norm_raw)
        for attempt in range(CATCH_UP_TRIES):
            if attempt:
                await self.host.refresh_view()  # a holder may have been replaced meanwhile
            self.start(state, meta, None, to=rest)
            failed = await self.delivered()
            rest = tuple(i for i, e in failed.items() if isinstance(e, PeerUnavailableError))
            if not rest:
                return

    def drop(self) -> None:
        """The driver stops: cancel a push still in flight."""
        push, self._push = self._push, None
        if push is not None and not push.done():
            push.cancel()
