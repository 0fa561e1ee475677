"""Stage 0's part of the training microbatches a member of its group was given (docs/groups.md "Stage 0's group"):
the member a microbatch starts and ends at, its *origin*, embeds the microbatch's tokens (drawn from (seed, step),
as every member draws them), sends them along the path the driver pinned, computes the head and the loss when the
activations come back from the last stage, runs the embedding backward when the gradient comes back from the
first, and then reports the microbatch done with its loss. The lead of stage 0's group is the origin of the
microbatches its balancer gives it; a follower of those it is assigned (rpc_assign), and it reports them with
rpc_done. Each member accumulates the embedding and head gradients of its own microbatches, once per attempt
(train/worker.py), and the group averages them weighted by how many each took (train/commit.py).

One job: running stage 0's end of the microbatches this member was given. It sees the node through `OriginHost`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cfnode.errors import InvalidPayload
from cfnode.train.schedule import AttemptKey

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.train.worker import StageWorker

logger = logging.getLogger(__name__)


class OriginHost(Protocol):
    config: NodeConfig
    worker: StageWorker | None

    async def compute(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...
    async def send_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor, target: int) -> bool: ...
    def route_target(self, method: str, meta: dict[str, Any]) -> int: ...
    async def microbatch_done(self, meta: dict[str, Any], loss: float) -> None: ...


class OriginRuns:
    def __init__(self, host: OriginHost) -> None:
        self.host = host
        self.cfg = host.config
        self.tokens: torch.Tensor | None = None
        """The run's training tokens (loaded by the driver, on every member of stage 0's group)."""
        self.key: AttemptKey | None = None
        """The attempt whose microbatches we run (hops of any other are stale)."""
        self._incarnation: dict[int, int] = {}
        self._losses: dict[int, float] = {}
        self._batch: tuple[int, torch.Tensor] | None = None

    def batch(self, step: int) -> torch.Tensor:
        """Step `step`'s microbatches, a pure function of (seed, step): (num_mb, microbatch_size, seq_len + 1)."""
        if self._batch is None or self._batch[0] != step:
            from cfnode.model.data import batch_for_step

            assert self.tokens is not None, "the training tokens are not loaded"
            train = self.cfg.train
            self._batch = (step, batch_for_step(self.tokens, seed=self.cfg.data.seed, step=step,
                                                num_microbatches=train.num_microbatches,
                                                microbatch_size=train.microbatch_size, seq_len=self.cfg.model.seq_len))
        return self._batch[1]

    def open(self, key: AttemptKey) -> None:
        """Run microbatches of attempt `key` from now on (the same attempt again changes nothing)."""
        if key != self.key:
            self.key, self._incarnation, self._losses = key, {}, {}

    def close(self) -> None:
        """The driver's attempt is over: its hops are stale."""
        self.key = None

    def take(self, key: AttemptKey, meta: dict[str, Any]) -> bool:
        """We are given incarnation `inc` of a microbatch of attempt `key`; False if a newer one was given."""
        self.open(key)
        mb, inc = meta["mb"], meta.get("inc", 0)
        if inc < self._incarnation.get(mb, 0):
            return False
        self._incarnation[mb] = inc
        return True

    def accept(self, method: str, meta: dict[str, Any], key: AttemptKey) -> bool:
        """Synchronous check in the RPC handler: a hop of a microbatch we run (InvalidPayload `stale_step` for
        another attempt; False for an incarnation sent again since: acknowledged and dropped)."""
        if self.key is None or key != self.key:
            raise InvalidPayload("stale_step", f"attempt {tuple(key)} is not in progress")
        if meta["mb"] not in self._incarnation:
            raise InvalidPayload("stale_step", f"microbatch {meta['mb']} is not one we run")
        return self._current(key, meta)

    def _current(self, key: AttemptKey, meta: dict[str, Any]) -> bool:
        return key == self.key and self._incarnation.get(meta["mb"]) == meta.get("inc", 0)

    async def start(self, meta: dict[str, Any]) -> bool:
        """Embed the microbatch and send it to the first stage of its route; False if that send failed (it was
        reported to the driver)."""
        host, worker = self.host, self.host.worker
        assert worker is not None
        key, mb, inc = AttemptKey(meta["step"], meta["attempt"]), meta["mb"], meta.get("inc", 0)
        try:
            hidden = await host.compute(worker.embed, key, mb, self.batch(key.step)[mb, :, :-1], inc)
        except KeyError:  # a newer incarnation was embedded meanwhile
            return True
        await host.compute(worker.shadow_forward, hidden)  # `redundant` only: stage 1's forward, again
        if not self._current(key, meta):
            return True
        return await host.send_hop("forward", meta, hidden, meta["to_stage"])

    async def process(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        """Activations back from the last stage: loss, then its gradient back along the route; the gradient back
        from the first stage: the embedding backward completes the microbatch."""
        host, worker = self.host, self.host.worker
        assert worker is not None
        key, mb = AttemptKey(meta["step"], meta["attempt"]), meta["mb"]
        if not self._current(key, meta):
            return
        if method == "forward":
            targets = self.batch(key.step)[mb, :, 1:]
            loss, grad = await host.compute(worker.head_backward, key, mb, tensor, targets,
                                            self.cfg.train.num_microbatches)
            if not self._current(key, meta):
                return
            self._losses[mb] = loss
            await host.send_hop("backward", meta, grad, host.route_target("backward", meta))
            return
        try:
            await host.compute(worker.embed_backward, key, mb, tensor, meta.get("inc", 0))
        except KeyError:
            return
        if self._current(key, meta) and mb in self._losses:
            await host.microbatch_done(meta, self._losses[mb])
