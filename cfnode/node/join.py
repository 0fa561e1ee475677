"""Joining a live stage group exactly (docs/architecture.md "Stage groups"): announce JOINING on the stage, ask
stage 0 to be admitted (it answers at a step boundary with the step and a member to copy, and holds the ring),
copy that member's weights, Adam state and step (`rpc_get_weights` uid "state"), and go ONLINE with the group's
generation and `joined_from` naming the member. No CheckFree: nothing was lost.

Sees the node through `JoinHost`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from cfnode.errors import PeerUnavailableError, RecoveryError, RejectedError
from cfnode.model.stages import build_stage
from cfnode.net.records import StageState
from cfnode.recovery import copies
from cfnode.train.averaging import AveragingError
from cfnode.train.worker import StageWorker

if TYPE_CHECKING:
    from cfnode.node.routes import RouteTable
    from cfnode.train.averaging import GroupAverager

logger = logging.getLogger(__name__)
VISIBILITY_READS = 4
STATE_COPIES = 3
"""Weights, Adam's two moments: a member's state is about three times its weights."""


class JoinHost(copies.CopyHost, Protocol):
    peer_id: str
    routes: RouteTable
    max_replica_bytes: int
    joined_from: str

    def set_state(self, state: StageState, *, stage: int | None) -> None: ...
    async def announce(self) -> None: ...
    def group_averager(self, size: int | None = None) -> GroupAverager: ...


async def join_group(host: JoinHost, stage: int) -> StageWorker:
    """Become an exact copy of a member of `stage`'s group at a step boundary; raises RecoveryError to give the
    stage back (the group filled up, the member died, the copy did not match)."""
    cfg = host.config
    assert host.client is not None
    started = time.perf_counter()
    group = host.routes.view.group(stage)
    if not group:
        raise RecoveryError(f"stage {stage}'s group is gone")
    try:
        stage0 = host.route(0)
    except PeerUnavailableError as e:
        raise RecoveryError(f"no stage 0 to admit us into stage {stage}'s group yet") from e
    host.generation = group[0].record.generation
    host.set_state(StageState.JOINING, stage=stage)
    await host.announce()
    await _until_visible(host, stage)
    module = await host.compute(build_stage, cfg.model, stage, cfg.model_path)
    worker = StageWorker.for_train(module, stage_idx=stage, train=cfg.train, every_microbatch=False)
    try:  # before we are admitted: the members' first all-reduce with us must not wait for our averager to start
        await host.group_averager(worker.num_parameters).warm(len(group) + 1)
    except AveragingError as e:
        raise RecoveryError(f"cannot average with stage {stage}'s group: {e}") from e
    logger.info("asking stage 0 to join stage %d's group (%d members, generation %d)", stage, len(group),
                host.generation)
    try:
        admitted = await host.client.admit(stage0, {"run": host.run_id, "stage": stage,
                                                     "generation": host.generation},
                                           timeout_s=cfg.group.join_timeout_s + cfg.train.step_timeout_s)
        source, step = str(admitted["source"]), int(admitted["step"])
        meta, tensors = await host.client.get_weights(source, max_bytes=STATE_COPIES * host.max_replica_bytes,
                                                      timeout_s=cfg.recovery.fetch_timeout_s, state=True)
    except (PeerUnavailableError, RejectedError, KeyError, ValueError, TypeError) as e:
        raise RecoveryError(f"joining stage {stage}'s group failed: {e}") from e
    if (meta.get("stage"), meta.get("step"), meta.get("generation"), meta.get("config_hash")) != \
            (stage, step, host.generation, cfg.model.config_hash()):
        raise RecoveryError(f"the copy of stage {stage} from {source[:12]} is at stage {meta.get('stage')}, step "
                            f"{meta.get('step')}, generation {meta.get('generation')}; expected step {step}, "
                            f"generation {host.generation}")
    try:
        await host.compute(worker.install_state, meta, tensors)
    except (KeyError, ValueError, RuntimeError) as e:
        raise RecoveryError(f"the copy of stage {stage} from {source[:12]} does not fit: {e}") from e
    host.joined_from = source
    took = time.perf_counter() - started
    logger.info("joined stage %d's group as an exact copy of %s at step %d (%.2fs)", stage, source[:12], step, took)
    host.events.emit("joined_group", stage=stage, source=source[:12], step=step, generation=host.generation,
                     duration_s=round(took, 4))
    host.metrics.group_joins.labels(role="joined").inc()
    return worker


async def _until_visible(host: JoinHost, stage: int) -> None:
    """Stage 0 admits only a peer with a record in the run: read our JOINING record back first."""
    for _ in range(VISIBILITY_READS):
        await host.routes.refresh()
        if any(p.peer_id == host.peer_id for p in host.routes.last_read.members(stage)):
            return
        await asyncio.sleep(host.config.heartbeat.claim_jitter_s / 2)
