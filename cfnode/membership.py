"""How a node gets, keeps and loses a stage: the run's config check, the claim protocol (ARCHITECTURE §5),
rebuilding a stage that had trained (§7), and what the membership view tells a holder (fencing, lost
neighbours, an unrecoverable stage 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cfnode import replication
from cfnode.errors import (
    ConfigMismatchError,
    PeerUnavailableError,
    RecoveryError,
    RejectedError,
    UnrecoverableError,
)
from cfnode.model.stages import build_stage, empty_stage  # transformers: ~2 s to import: paid at start
from cfnode.net.records import (
    MetaRecord,
    StageState,
    SwarmView,
    claim_rivals,
    is_occupied,
    keeps_claim,
    run_meta,
    swarm_has_trained,
)
from cfnode.recovery import store
from cfnode.recovery.coordinator import Rebuilder, RecoveryResult, plan_recovery
from cfnode.recovery.replicas import replica_of, replica_targets
from cfnode.train.schedule import next_stage, prev_stage
from cfnode.train.worker import StageWorker

if TYPE_CHECKING:
    import torch

    from cfnode.node import Node

logger = logging.getLogger(__name__)


async def check_meta(node: Node) -> None:
    """Refuse a run whose model or run-wide settings differ from ours; then publish our own copy of the meta
    (every node keeps one under its owner marker; `run_meta` picks the run's from the live members' copies)."""
    mine = _meta_record(node)
    found = await node.swarm.read_meta()
    if isinstance(found, Mapping):
        theirs = run_meta(found, await node.swarm.read_view()) if found else None
    else:  # a store without owner-bound copies (the in-memory harness) returns the one record
        theirs = found
    if theirs is not None and (problem := meta_mismatch(node.run_id, theirs, mine, preset=node.config.model.preset)):
        raise ConfigMismatchError(problem)
    await node.swarm.store_meta(mine)


_RUN_WIDE = (  # (MetaRecord field, how a user sets it, why every node must agree)
    ("recovery_rule", "--recovery-rule", "every rebuild of a stage must follow the run's rule"),
    ("microbatch_size", "--microbatch-size", "every stage must expect the run's activation shapes"),
    ("num_microbatches", "--microbatches", "every stage must commit after the same microbatches"),
    ("clip_norm", "train.clip_norm", "every stage must clip at the run's norm (CheckFree weighs the clipped norms)"),
)


def meta_mismatch(run_id: str, theirs: MetaRecord, mine: MetaRecord, *, preset: str) -> str | None:
    """Why a node with meta `mine` may not join a run whose meta is `theirs` (naming the setting, the run's value
    and ours), or None."""
    if theirs.recovery_mode != mine.recovery_mode:
        return (f"run {run_id!r} uses --recovery {theirs.recovery_mode}; this node was started with "
                f"--recovery {mine.recovery_mode}. Every node of a run must route microbatches the same way.")
    if theirs.model_config_hash != mine.model_config_hash:
        return (f"run {run_id!r} trains a model with config hash {theirs.model_config_hash} "
                f"({theirs.num_stages} stages); this node's is {mine.model_config_hash} "
                f"({mine.num_stages} stages, preset {preset!r}). Use the same --preset, --stages and "
                "--model-path as the swarm, or another --run-id.")
    for name, flag, why in _RUN_WIDE:
        if getattr(theirs, name) != getattr(mine, name):
            return (f"run {run_id!r} uses {flag} {getattr(theirs, name)}; this node was started with {flag} "
                    f"{getattr(mine, name)}: {why}. Use the run's value, or another --run-id.")
    return None


def _meta_record(node: Node) -> MetaRecord:
    model, train, recovery = node.config.model, node.config.train, node.config.recovery
    return MetaRecord(num_stages=model.num_stages, model_config_hash=model.config_hash(),
                      recovery_mode=recovery.mode, recovery_rule=recovery.rule,
                      microbatch_size=train.microbatch_size, num_microbatches=train.num_microbatches,
                      clip_norm=float(train.clip_norm))


async def store_meta(node: Node) -> None:
    await node.swarm.store_meta(_meta_record(node))


def copy_holders(view: SwarmView, stage: int, num_stages: int, mode: str) -> set[int]:
    """Live stages that keep a copy of `stage` (recovery/replicas.py) and report holding one."""
    return {i for i in replica_targets(stage, num_stages, mode)
            if (o := view.online_owner(i)) is not None and o.record.replica_step >= 0}


def stage0_recoverable(view: SwarmView, num_stages: int, mode: str) -> bool:
    """Stage 0 can be rebuilt: from a live copy (checkfree+, redundant) or from the checkpoint store."""
    return mode == "checkpoint" or bool(copy_holders(view, 0, num_stages, mode))


def claimable_stages(view: SwarmView, num_stages: int, wanted: int | None, *, mode: str = "checkfree") -> list[int]:
    """Empty stages this node may take, lowest first. Once the swarm has trained, stage 0 is taken only to
    rebuild it (from a live copy or the checkpoint store): otherwise its embedding and head exist nowhere
    else, and a fresh one would be garbage."""
    candidates = range(num_stages + 1) if wanted is None else [wanted]
    stage0_ok = not swarm_has_trained(view, num_stages) or stage0_recoverable(view, num_stages, mode)
    return [i for i in candidates if not is_occupied(view.members(i), view.now) and (i != 0 or stage0_ok)]


async def claim_stage(node: Node) -> int:
    """JOINING + jitter + tie-break on the lowest claimable stage; otherwise wait as STANDBY."""
    cfg = node.config
    announced_standby = False
    while True:
        try:
            view = await node.routes.refresh()  # a claim decides on a fresh read, never on a kept one
        except Exception as e:  # noqa: BLE001 - a DHT failure delays the claim, it does not end the node
            node.metrics.loop_errors.labels(loop="claim").inc()
            logger.warning("claim: DHT read failed (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(cfg.heartbeat.period_s)
            continue
        await confirm_unrecoverable(node, view)
        targets = claimable_stages(view, cfg.model.num_stages, cfg.stage, mode=cfg.recovery.mode)
        if not targets:
            if not announced_standby:
                node.set_state(StageState.STANDBY, stage=None)
                try:
                    await node.announce()
                except Exception as e:  # noqa: BLE001 - the heartbeat announces it again
                    logger.warning("announcing STANDBY failed (%s: %s); the heartbeat retries", type(e).__name__, e)
                logger.info("no free stage; waiting as STANDBY")
                node.events.emit("standby")
                announced_standby = True
            await asyncio.sleep(cfg.heartbeat.period_s)
            continue
        target = targets[0]
        node.generation = node.routes.generations.get(target, 0)
        node.set_state(StageState.JOINING, stage=target)
        try:
            await node.announce()
            await asyncio.sleep(node.rng.uniform(0.1, max(0.1, cfg.heartbeat.claim_jitter_s)))
            view = await node.routes.refresh()
            kept = keeps_claim(view, target, node.peer_id)
        except Exception as e:  # noqa: BLE001 - a failed write or read loses this round, not the node
            node.metrics.loop_errors.labels(loop="claim").inc()
            logger.warning("claim of stage %d: DHT call failed (%s: %s); retrying", target, type(e).__name__, e)
            kept = False
        if kept:
            logger.info("claimed stage %d", target)
            node.events.emit("claimed", stage=target)
            return target
        logger.info("lost the race for stage %d; retrying", target)
        await retreat(node, target)
        node.set_state(StageState.STANDBY if announced_standby else StageState.JOINING, stage=None)
        await asyncio.sleep(node.rng.uniform(0.0, cfg.heartbeat.claim_jitter_s))


async def retreat(node: Node, stage: int) -> None:
    """Announce OFFLINE for a stage we claimed or held (best effort; a later expiration than our last
    heartbeat, so it replaces it and the stage reads as empty at once)."""
    node.set_state(StageState.OFFLINE, stage=stage)
    try:
        await node.store_own(stage, ttl_s=node.config.heartbeat.ttl_s + 1)
    except Exception as e:  # noqa: BLE001 - the record expires on its own
        logger.info("could not announce OFFLINE for stage %d: %s", stage, e)


CONFIRM_READS = 4


async def confirm_claim(node: Node, stage: int, *, fresh_build: bool) -> None:
    """After announcing RECOVERING (and rebuilding), before ONLINE: re-read and make sure no other claimant
    outranks us (a higher generation, or ours with a peer id that sorts first: two spares that did not see each
    other's JOINING). Raises RecoveryError to give the stage back."""
    await asyncio.sleep(node.config.heartbeat.claim_jitter_s)  # rival claims written before ours become visible
    for _ in range(CONFIRM_READS):  # a read that misses our own record may miss a rival's too: read again
        view = await node.routes.refresh()
        if any(p.peer_id == node.peer_id and p.record.generation == node.generation
               for p in node.routes.last_read.members(stage)):
            break
        await asyncio.sleep(node.config.heartbeat.claim_jitter_s / 2)
    else:
        raise RecoveryError(f"could not read our own claim of stage {stage} back; giving it back to be safe")
    if fresh_build and swarm_has_trained(view, node.config.model.num_stages):
        raise RecoveryError(f"the swarm trained while stage {stage} was built from the seeded init")
    rivals = claim_rivals(view, stage, node.peer_id, node.generation)
    if rivals:
        best = max(rivals, key=lambda p: (p.record.generation, -ord(p.peer_id[0])))
        node.events.emit("claim_lost", stage=stage, to=best.peer_id[:12], generation=best.record.generation)
        raise RecoveryError(f"stage {stage} is claimed by {best.peer_id[:12]} at generation "
                            f"{best.record.generation} (ours {node.generation})")


async def acquire_stage(node: Node, stage: int) -> StageWorker:
    """Build the stage: the seeded init if the swarm never trained, else a CheckFree rebuild from the
    neighbours (fresh Adam at lr * lr_scale, generation + 1, step = the donors' step)."""
    cfg = node.config
    num = cfg.model.num_stages
    module = await node.compute(build_stage, cfg.model, stage, cfg.model_path)
    worker = StageWorker(module, stage_idx=stage, lr=cfg.train.lr, clip_norm=cfg.train.clip_norm)
    successor = replica_of(stage, num, cfg.recovery.mode)
    if cfg.recovery.mode == "redundant" and successor not in (None, 0):  # runs its successor's forward too
        worker.shadow_module = await node.compute(empty_stage, cfg.model, successor)
    view = await node.routes.refresh()
    node.generation = node.routes.next_generation(stage)  # never one the swarm used for this stage
    node.set_state(StageState.RECOVERING, stage=stage)
    await node.announce()
    if not swarm_has_trained(view, num):  # a seeded init: just leave rival claims time to show (confirm_claim)
        await asyncio.sleep(node.rng.uniform(0.1, max(0.1, cfg.heartbeat.claim_jitter_s)))
        return worker
    if cfg.recovery.mode == "checkpoint":
        return await _rejoin_from_checkpoint(node, worker, stage, view)
    started = time.perf_counter()
    live = {i for i in range(num + 1) if i != stage and view.online_owner(i) is not None}
    fresh = {i for i in live if not view.online_owner(i).record.donor}  # type: ignore[union-attr]
    plan = plan_recovery(stage, live, num, swaps=cfg.swaps, fresh=fresh,  # UnrecoverableError: stage 0
                         replicas=copy_holders(view, stage, num, cfg.recovery.mode))
    node.events.emit("recovery_started", stage=stage, rule=cfg.recovery.rule, kind=plan.kind,
                     prev=plan.prev_source, next=plan.next_source, replicas=list(plan.replica_sources),
                     degraded=plan.degraded, generation=node.generation)
    rebuilder = Rebuilder(rule=cfg.recovery.rule, config_hash=cfg.model.config_hash(),
                          clip_norm=cfg.train.clip_norm, fetch=lambda idx: _fetch(node, idx),
                          fetch_replica=lambda idx: _fetch(node, idx, replica=True),
                          norm_power=cfg.recovery.norm_power,
                          norms=await _committed_norms(node) if plan.kind == "neighbours" else {})
    fresh = await node.compute(worker.snapshot)
    known_step = max((o.record.step for i in range(cfg.model.num_stages + 1)
                      if (o := view.online_owner(i)) is not None), default=0)
    try:
        result = await rebuilder.run(plan, fresh, known_step=known_step)
        if cfg.recovery.debug_stall_s > 0:  # test seam: a window in which to kill a rebuilding node
            logger.warning("stalling the rebuild for %.1fs (--debug-recovery-stall)", cfg.recovery.debug_stall_s)
            await asyncio.sleep(cfg.recovery.debug_stall_s)
    except (RecoveryError, PeerUnavailableError, RejectedError) as e:
        node.metrics.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="rejected_input").inc()
        node.events.emit("recovery_failed", stage=stage, error=str(e)[:300])
        raise RecoveryError(f"rebuilding stage {stage} failed: {e}") from e
    lr = cfg.train.lr * cfg.recovery.lr_scale
    installing = time.perf_counter()
    await node.compute(worker.install, result.state, step=result.step, lr=lr)
    install_s = time.perf_counter() - installing
    took = time.perf_counter() - started
    if cfg.recovery.audit_dir:
        await node.compute(_write_audit, cfg.recovery.audit_dir, stage, node.generation, result)
    level = logging.WARNING if plan.degraded else logging.INFO
    logger.log(level, "rebuilt stage %d by %s from %s%s in %.2fs (fetch %.2fs); step %d, generation %d, lr %.2e",
               stage, result.how, result.sources, " (degraded)" if plan.degraded else "", took, result.fetch_s,
               result.step, node.generation, lr)
    node.events.emit("recovery_finished", stage=stage, how=result.how, kind=plan.kind, sources=result.sources,
                     degraded=plan.degraded, rule=cfg.recovery.rule, duration_s=round(took, 4),
                     fetch_s=round(result.fetch_s, 4), average_s=round(result.average_s, 4),
                     install_s=round(install_s, 4), step=result.step, generation=node.generation, lr=lr,
                     norms={side: n.grad_norm for side, n in result.neighbours.items()})
    m = node.metrics
    m.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="success").inc()
    m.recovery_duration.observe(took)
    m.last_recovery.set(node.clock.time())
    m.learning_rate.set(lr)
    return worker


async def _rejoin_from_checkpoint(node: Node, worker: StageWorker, stage: int, view: SwarmView) -> StageWorker:
    """`checkpoint` baseline: a replacement stage 0 loads its part of the newest complete checkpoint (and its
    driver then rolls every stage back to it); any other stage joins with the seeded weights, which stage 0's
    rollback overwrites before the next step."""
    cfg = node.config
    started = time.perf_counter()
    node.events.emit("recovery_started", stage=stage, rule="checkpoint", kind="checkpoint", prev=None, next=None,
                     replicas=[], degraded=False, generation=node.generation)
    step = max((o.record.step for i in range(cfg.model.num_stages + 1)
                if (o := view.online_owner(i)) is not None), default=0)
    how = "rollback-pending"
    if stage == 0:
        root = replication.checkpoint_root(node)
        step = store.latest_complete(root)
        if step > 0:
            try:
                payload = await asyncio.to_thread(store.load_stage, root, step, 0)
                await node.compute(worker.restore, payload, step=step, fresh={})
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise RecoveryError(f"cannot load stage 0's checkpoint of step {step}: {e}") from e
        how = "checkpoint"
    else:
        worker.step = step
    took = time.perf_counter() - started
    node.events.emit("recovery_finished", stage=stage, how=how, kind="checkpoint", sources={}, degraded=False,
                     rule="checkpoint", duration_s=round(took, 4), fetch_s=0.0, average_s=0.0, install_s=round(took, 4),
                     step=step, generation=node.generation, lr=worker.lr, norms={})
    node.metrics.recoveries.labels(role="recovered", rule=cfg.recovery.rule, result="success").inc()
    node.metrics.recovery_duration.observe(took)
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


async def _fetch(node: Node, stage_idx: int, *, replica: bool = False
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A donor's weights (or the stage-0 replica it holds); a stream cut short (seen with hivemind under load)
    is fetched again."""
    assert node.client is not None
    peer = node.route(stage_idx)
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            return await node.client.get_weights(peer, max_bytes=node.max_replica_bytes, replica=replica,
                                                 timeout_s=node.config.recovery.fetch_timeout_s)
        except RejectedError as e:
            if e.reason != "decode" or attempt == FETCH_ATTEMPTS:
                raise
            logger.warning("weights of stage %d arrived incomplete (%s); fetching again", stage_idx, e.detail)
            node.metrics.rpc_retries.labels(method="get_weights").inc()
    raise AssertionError("unreachable")


def stage0_lost(node: Node, view: SwarmView) -> bool:
    """Stage 0 is gone from a swarm that had trained, and nothing can rebuild it."""
    num = node.config.model.num_stages
    return (view.online_owner(0) is None and not is_occupied(view.members(0), view.now)
            and swarm_has_trained(view, num) and not stage0_recoverable(view, num, node.config.recovery.mode))


async def confirm_unrecoverable(node: Node, view: SwarmView) -> None:
    """Log once (and export) that stage 0 is gone for good, but only after its last known holder fails a ping:
    a read that merely missed its record (a slow DHT) is not a loss."""
    if not stage0_lost(node, view):
        node.metrics.unrecoverable.set(0)
        node.unrecoverable_logged = False
        return
    if node.unrecoverable_logged:
        return
    last = node.last_stage0_peer
    if last is not None and node.client is not None and await node.is_reachable(last):
        logger.info("stage 0's record is missing from the view but its holder %s answers; not a loss", last[:12])
        return
    note_unrecoverable(node, view)


def note_unrecoverable(node: Node, view: SwarmView) -> None:
    """Log once (and export) that stage 0 is gone from a swarm that had trained."""
    num = node.config.model.num_stages
    lost = stage0_lost(node, view)
    node.metrics.unrecoverable.set(1 if lost else 0)
    if lost and not node.unrecoverable_logged:
        node.unrecoverable_logged = True
        left = any(p.record.state is StageState.OFFLINE for p in view.members(0))
        why = ("no live stage holds a copy of it" if replica_targets(0, num, node.config.recovery.mode)
               else "it cannot be rebuilt without checkfree+")
        err = UnrecoverableError(
            f"stage 0 (embedding, final norm, LM head) {'left the run' if left else 'was lost'} and {why}; "
            "training is paused for good")
        logger.log(logging.WARNING if left else logging.ERROR, "%s", err)
        has_copies = bool(replica_targets(0, num, node.config.recovery.mode))
        node.events.emit("unrecoverable", stage=0,
                         reason="stage 0 lost; no live copy" if has_copies else "stage 0 lost; needs checkfree+")
        node.metrics.recoveries.labels(role="recovered", rule=node.config.recovery.rule,
                                       result="unrecoverable").inc()
    elif not lost:
        node.unrecoverable_logged = False


async def watch(node: Node, view: SwarmView) -> None:
    """What a stage holder learns from each membership read (our own record is always in `view`)."""
    if (owner0 := view.online_owner(0)) is not None:
        node.last_stage0_peer = owner0.peer_id
    await confirm_unrecoverable(node, view)
    stage = node.stage
    if stage is None or node.state is not StageState.ONLINE:
        return
    owner = view.online_owner(stage)
    if owner is not None and owner.peer_id != node.peer_id:  # whoever outranks us: one owner per stage
        logger.warning("stage %d is now held by %s at generation %d (ours %d); stepping down to STANDBY",
                       stage, owner.peer_id[:12], owner.record.generation, node.generation)
        node.events.emit("fenced", stage=stage, by=owner.peer_id[:12], generation=owner.record.generation)
        node.fence()
        return
    num = node.config.model.num_stages
    for side, idx in (("prev", prev_stage(stage, num)), ("next", next_stage(stage, num))):
        alive = view.online_owner(idx) is not None
        if alive:
            node.seen_neighbours.add(idx)
        # One detection per incident: a neighbour seen ONLINE since we went ONLINE now has no live owner (a
        # stage that never had one, e.g. at start-up, is not a failure; failed hops are counted elsewhere).
        if not alive and idx in node.seen_neighbours and idx not in node.lost_neighbours:
            node.lost_neighbours.add(idx)
            left = any(p.record.state is StageState.OFFLINE for p in view.members(idx))
            node.metrics.stage_failures_detected.labels(neighbor=side).inc()
            node.events.emit("neighbour_lost", stage=idx, side=side, how="left" if left else "expired")
            logger.warning("neighbour stage %d (%s) has no live owner (%s)", idx, side,
                           "it left: OFFLINE record" if left else "its heartbeat record expired")
        elif alive and idx in node.lost_neighbours:
            node.lost_neighbours.discard(idx)
            node.events.emit("neighbour_back", stage=idx, side=side)


async def _committed_norms(node: Node) -> dict[int, tuple[int, float]]:
    """The gradient norms the transformer stages reported to stage 0 in their last commits, as stage 0 keeps
    them: {stage: (steps committed, post-clip norm)}. A donor's own claim is not trusted for its weight in the
    average. Empty if stage 0 cannot be asked (the rebuild then falls back to the donors' reports)."""
    assert node.client is not None
    try:
        info = await node.client.info(node.route(0))
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
