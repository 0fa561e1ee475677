"""Building the stage a node claimed (ARCHITECTURE §7): the seeded init if the swarm never trained; otherwise a
CheckFree rebuild from the neighbours (or a copy: checkfree+, redundant), weighted by the gradient norms stage 0
kept from their commits, installed with a fresh Adam at lr * lr_scale and a generation the stage never had;
for the `checkpoint` baseline, a rejoin from the newest complete checkpoint.

The recovery math is recovery/coordinator.py (pure); this module fetches, installs and reports, and sees the
node through `RebuildHost`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.errors import PeerUnavailableError, RecoveryError, RejectedError
from cfnode.model.stages import build_stage, empty_stage  # transformers: ~2 s to import: paid at start
from cfnode.net.records import StageState, SwarmView, swarm_has_trained
from cfnode.node.watch import copy_holders
from cfnode.recovery import copies, store
from cfnode.recovery.coordinator import Rebuilder, RecoveryResult, plan_recovery
from cfnode.recovery.replicas import replica_of
from cfnode.train.worker import StageWorker

if TYPE_CHECKING:
    import torch

    from cfnode.clock import Clock
    from cfnode.node.routes import RouteTable

logger = logging.getLogger(__name__)


class RebuildHost(copies.CopyHost, Protocol):
    routes: RouteTable
    rng: random.Random
    clock: Clock
    max_replica_bytes: int

    def set_state(self, state: StageState, *, stage: int | None) -> None: ...
    async def announce(self) -> None: ...


async def acquire_stage(host: RebuildHost, stage: int) -> StageWorker:
    """Build the stage: the seeded init if the swarm never trained, else a CheckFree rebuild from the
    neighbours (fresh Adam at lr * lr_scale, generation + 1, step = the donors' step)."""
    cfg = host.config
    num = cfg.model.num_stages
    module = await host.compute(build_stage, cfg.model, stage, cfg.model_path)
    worker = StageWorker.for_train(module, stage_idx=stage, train=cfg.train,
                                    every_microbatch=cfg.group.replicas == 1)
    successor = replica_of(stage, num, cfg.recovery.mode)
    if cfg.recovery.mode == "redundant" and successor not in (None, 0):  # runs its successor's forward too
        worker.shadow_module = await host.compute(empty_stage, cfg.model, successor)
    view = await host.routes.refresh()
    host.generation = host.routes.next_generation(stage)  # never one the swarm used for this stage
    host.set_state(StageState.RECOVERING, stage=stage)
    await host.announce()
    if not swarm_has_trained(view, num, cfg.train.start_step):  # initial weights: leave rival claims time to show
        worker.start_at(cfg.train.start_step)
        await asyncio.sleep(host.rng.uniform(0.1, max(0.1, cfg.heartbeat.claim_jitter_s)))
        return worker
    if cfg.recovery.mode == "checkpoint":
        return await _rejoin_from_checkpoint(host, worker, stage, view)
    started = time.perf_counter()
    live = {i for i in range(num + 1) if i != stage and view.online_owner(i) is not None}
    fresh = {i for i in live if not view.online_owner(i).record.donor}  # type: ignore[union-attr]
    plan = plan_recovery(stage, live, num, swaps=cfg.swaps, fresh=fresh,  # UnrecoverableError: stage 0
                         replicas=copy_holders(view, stage, num, cfg.recovery.mode))
    host.events.emit("recovery_started", stage=stage, rule=cfg.recovery.rule, kind=plan.kind,
                     prev=plan.prev_source, next=plan.next_source, replicas=list(plan.replica_sources),
                     degraded=plan.degraded, generation=host.generation)
    rebuilder = Rebuilder(rule=cfg.recovery.rule, config_hash=cfg.model.config_hash(),
                          clip_norm=cfg.train.clip_norm, fetch=lambda idx: _fetch(host, idx),
                          fetch_replica=lambda idx: _fetch(host, idx, replica=True),
                          norm_power=cfg.recovery.norm_power,
                          norms=await _committed_norms(host) if plan.kind == "neighbours" else {})
    fresh = await host.compute(worker.snapshot)
    known_step = max((o.record.step for i in range(cfg.model.num_stages + 1)
                      if (o := view.online_owner(i)) is not None), default=0)
    try:
        result = await rebuilder.run(plan, fresh, known_step=known_step)
        if cfg.recovery.debug_stall_s > 0:  # test seam: a window in which to kill a rebuilding node
            logger.warning("stalling the rebuild for %.1fs (--debug-recovery-stall)", cfg.recovery.debug_stall_s)
            await asyncio.sleep(cfg.recovery.debug_stall_s)
    except (RecoveryError, PeerUnavailableError, RejectedError) as e:
        host.metrics.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="rejected_input").inc()
        host.events.emit("recovery_failed", stage=stage, error=str(e)[:300])
        raise RecoveryError(f"rebuilding stage {stage} failed: {e}") from e
    lr = cfg.train.lr * cfg.recovery.lr_scale
    installing = time.perf_counter()
    await host.compute(worker.install, result.state, step=result.step, lr=lr)
    install_s = time.perf_counter() - installing
    took = time.perf_counter() - started
    if cfg.recovery.audit_dir:
        await host.compute(_write_audit, cfg.recovery.audit_dir, stage, host.generation, result)
    level = logging.WARNING if plan.degraded else logging.INFO
    logger.log(level, "rebuilt stage %d by %s from %s%s in %.2fs (fetch %.2fs); step %d, generation %d, lr %.2e",
               stage, result.how, result.sources, " (degraded)" if plan.degraded else "", took, result.fetch_s,
               result.step, host.generation, lr)
    host.events.emit("recovery_finished", stage=stage, how=result.how, kind=plan.kind, sources=result.sources,
                     degraded=plan.degraded, rule=cfg.recovery.rule, duration_s=round(took, 4),
                     fetch_s=round(result.fetch_s, 4), average_s=round(result.average_s, 4),
                     install_s=round(install_s, 4), step=result.step, generation=host.generation, lr=lr,
                     norms={side: n.grad_norm for side, n in result.neighbours.items()})
    m = host.metrics
    m.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="success").inc()
    m.recovery_duration.observe(took)
    m.last_recovery.set(host.clock.time())
    m.learning_rate.set(lr)
    return worker


async def _rejoin_from_checkpoint(host: RebuildHost, worker: StageWorker, stage: int, view: SwarmView) -> StageWorker:
    """`checkpoint` baseline: a replacement stage 0 loads its part of the newest complete checkpoint (and its
    driver then rolls every stage back to it); any other stage joins with the seeded weights, which stage 0's
    rollback overwrites before the next step."""
    cfg = host.config
    started = time.perf_counter()
    host.events.emit("recovery_started", stage=stage, rule="checkpoint", kind="checkpoint", prev=None, next=None,
                     replicas=[], degraded=False, generation=host.generation)
    step = max((o.record.step for i in range(cfg.model.num_stages + 1)
                if (o := view.online_owner(i)) is not None), default=0)
    how = "rollback-pending"
    if stage == 0:
        root = copies.checkpoint_root(host)
        step = store.latest_complete(root)
        if step > 0:
            try:
                payload = await asyncio.to_thread(store.load_stage, root, step, 0)
                await host.compute(worker.restore, payload, step=step, fresh={})
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise RecoveryError(f"cannot load stage 0's checkpoint of step {step}: {e}") from e
        how = "checkpoint"
    else:
        worker.step = step
    took = time.perf_counter() - started
    host.events.emit("recovery_finished", stage=stage, how=how, kind="checkpoint", sources={}, degraded=False,
                     rule="checkpoint", duration_s=round(took, 4), fetch_s=0.0, average_s=0.0, install_s=round(took, 4),
                     step=step, generation=host.generation, lr=worker.lr, norms={})
    host.metrics.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="success").inc()
    host.metrics.recovery_duration.observe(took)
    return worker


def _write_audit(directory: str, stage: int, generation: int, result: RecoveryResult) -> None:
    """--audit-recovery: the donors' tensors and norms and the rebuilt tensors, for independent checking."""
    import os

    import torch

    os.makedirs(directory, exist_ok=True)
    payload = {"stage": stage, "generation": generation, "how": result.how, "step": result.step,
               "sources": result.sources, "result": result.state,
               "neighbours": {side: {"state": dict(n.state), "grad_norm": n.grad_norm, "distance": n.distance,
                                     "step": n.step} for side, n in result.neighbours.items()}}
    torch.save(payload, os.path.join(directory, f"recovery-stage{stage}-gen{generation}.pt"))


FETCH_ATTEMPTS = 3


async def _fetch(host: RebuildHost, stage_idx: int, *, replica: bool = False
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A donor's weights (or the stage-0 replica it holds); a stream cut short (seen with hivemind under load)
    is fetched again."""
    assert host.client is not None
    peer = host.route(stage_idx)
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            return await host.client.get_weights(peer, max_bytes=host.max_replica_bytes, replica=replica,
                                                 timeout_s=host.config.recovery.fetch_timeout_s)
        except RejectedError as e:
            if e.reason != "decode" or attempt == FETCH_ATTEMPTS:
                raise
            logger.warning("weights of stage %d arrived incomplete (%s); fetching again", stage_idx, e.detail)
            host.metrics.rpc_retries.labels(method="get_weights").inc()
    raise AssertionError("unreachable")


async def _committed_norms(host: RebuildHost) -> dict[int, tuple[int, float]]:
    """The gradient norms the transformer stages reported to stage 0 in their last commits, as stage 0 keeps
    them: {stage: (steps committed, post-clip norm)}. A donor's own claim is not trusted for its weight in the
    average. Empty if stage 0 cannot be asked (the rebuild then falls back to the donors' reports)."""
    assert host.client is not None
    try:
        info = await host.client.info(host.route(0))
    except (PeerUnavailableError, RejectedError) as e:
        logger.warning("cannot ask stage 0 for the committed gradient norms (%s); using the donors' own", e)
        return {}
    out: dict[int, tuple[int, float]] = {}
    raw = info.get("commit_norms")
    if isinstance(raw, dict):
        for key, value in raw.items():
            if (isinstance(key, str) and key.isdigit() and isinstance(value, list) and len(value) >= 2
                    and type(value[0]) is int and isinstance(value[1], (int, float))):
                out[int(key)] = (value[0], float(value[1]))
    return out
