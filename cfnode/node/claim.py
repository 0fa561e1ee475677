"""How a node gets and gives back a stage (ARCHITECTURE §5, docs/protocol.md "Claiming a stage"): the run's
settings check at join, JOINING + jitter + tie-break on the lowest claimable stage (or STANDBY), the uniqueness
check between RECOVERING and ONLINE, and OFFLINE when giving a stage back. Building the stage is rebuild.py.

The decisions (`claimable_stages`, `meta_mismatch`, records.py's `keeps_claim` and `claim_rivals`) are pure
functions; the protocol sees the node through `ClaimHost`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cfnode.errors import ConfigMismatchError, RecoveryError
from cfnode.net.groups import group_to_join
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
from cfnode.node.watch import Watch, stage0_recoverable

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.metrics import NodeMetrics
    from cfnode.net.dht import SwarmStore
    from cfnode.node.routes import RouteTable

logger = logging.getLogger(__name__)


class ClaimHost(Protocol):
    config: NodeConfig
    run_id: str
    peer_id: str
    swarm: SwarmStore
    routes: RouteTable
    rng: random.Random
    events: EventLog
    metrics: NodeMetrics
    generation: int
    watch: Watch

    def set_state(self, state: StageState, *, stage: int | None) -> None: ...
    async def announce(self) -> None: ...
    async def store_own(self, stage: int | None, *, ttl_s: float | None = None) -> bool: ...


async def check_meta(host: ClaimHost) -> None:
    """Refuse a run whose model or run-wide settings differ from ours; then publish our own copy of the meta
    (every node keeps one under its owner marker; `run_meta` picks the run's from the live members' copies)."""
    mine = _meta_record(host)
    found = await host.swarm.read_meta()
    if isinstance(found, Mapping):
        theirs = run_meta(found, await host.swarm.read_view()) if found else None
    else:  # a store without owner-bound copies (the in-memory harness) returns the one record
        theirs = found
    if theirs is not None and (problem := meta_mismatch(host.run_id, theirs, mine, preset=host.config.model.preset)):
        raise ConfigMismatchError(problem)
    await host.swarm.store_meta(mine)


_RUN_WIDE = (  # (MetaRecord field, how a user sets it, why every node must agree)
    ("recovery_rule", "--recovery-rule", "every rebuild of a stage must follow the run's rule"),
    ("microbatch_size", "--microbatch-size", "every stage must expect the run's activation shapes"),
    ("num_microbatches", "--microbatches", "every stage must commit after the same microbatches"),
    ("clip_norm", "train.clip_norm", "every stage must clip at the run's norm (CheckFree weighs the clipped norms)"),
    ("start_step", "a start step (--model-path of an export)", "every stage must count steps from the run's start"),
    ("replicas", "--replicas", "every node must size the stage groups alike"),
    ("compute_dtype", "--compute-dtype", "every stage must compute (and scale float16 losses) alike"),
    ("wire_dtype", "--wire-dtype", "every stage must encode and decode the hops alike"),
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


def _meta_record(host: ClaimHost) -> MetaRecord:
    model, train, recovery = host.config.model, host.config.train, host.config.recovery
    return MetaRecord(num_stages=model.num_stages, model_config_hash=model.config_hash(),
                      recovery_mode=recovery.mode, recovery_rule=recovery.rule,
                      microbatch_size=train.microbatch_size, num_microbatches=train.num_microbatches,
                      clip_norm=float(train.clip_norm), start_step=train.start_step,
                      replicas=host.config.group.replicas, compute_dtype=train.compute_dtype,
                      wire_dtype=host.config.network.wire_dtype)


async def store_meta(host: ClaimHost) -> None:
    await host.swarm.store_meta(_meta_record(host))


def claimable_stages(view: SwarmView, num_stages: int, wanted: int | None, *, mode: str = "checkfree",
                     start_step: int = 0, spare: bool = False) -> list[int]:
    """Empty stages this node may take, lowest first. Once the swarm has trained, stage 0 is taken only to
    rebuild it (from a live copy or the checkpoint store): otherwise its embedding and head exist nowhere
    else, and a fresh one would be garbage. A `spare` (`--spare`) takes none before the swarm has trained: it
    only ever replaces a lost stage, so it can start together with the nodes that make the first ring."""
    trained = swarm_has_trained(view, num_stages, start_step)
    if spare and not trained:
        return []
    candidates = range(num_stages + 1) if wanted is None else [wanted]
    stage0_ok = not trained or stage0_recoverable(view, num_stages, mode)
    return [i for i in candidates if not is_occupied(view.members(i), view.now) and (i != 0 or stage0_ok)]


@dataclass(frozen=True)
class Claim:
    """The stage a node got: to build or rebuild it (`join` False), or to join its live group by exact copy."""

    stage: int
    join: bool = False


async def claim_stage(host: ClaimHost) -> Claim:
    """JOINING + jitter + tie-break on the lowest claimable stage; with stage groups and no empty stage, the live
    group with the least throughput (node/join.py); otherwise wait as STANDBY."""
    cfg = host.config
    announced_standby = False
    while True:
        try:
            view = await host.routes.refresh()  # a claim decides on a fresh read, never on a kept one
        except Exception as e:  # noqa: BLE001 - a DHT failure delays the claim, it does not end the node
            host.metrics.loop_errors.labels(loop="claim").inc()
            logger.warning("claim: DHT read failed (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(cfg.heartbeat.period_s)
            continue
        await host.watch.confirm_unrecoverable(view)
        targets = claimable_stages(view, cfg.model.num_stages, cfg.stage, mode=cfg.recovery.mode,
                                   start_step=cfg.train.start_step, spare=cfg.group.spare)
        joinable = None if targets or cfg.group.spare else group_to_join(view, cfg.model.num_stages,
                                                                         cfg.group.replicas, cfg.stage)
        if joinable is not None:
            logger.info("no empty stage; joining stage %d's group", joinable)
            host.events.emit("claimed", stage=joinable, join=True)
            return Claim(joinable, join=True)
        if not targets:
            if not announced_standby:
                host.set_state(StageState.STANDBY, stage=None)
                try:
                    await host.announce()
                except Exception as e:  # noqa: BLE001 - the heartbeat announces it again
                    logger.warning("announcing STANDBY failed (%s: %s); the heartbeat retries", type(e).__name__, e)
                logger.info("no free stage; waiting as STANDBY")
                host.events.emit("standby")
                announced_standby = True
            await asyncio.sleep(cfg.heartbeat.period_s)
            continue
        target = targets[0]
        host.generation = host.routes.generations.get(target, 0)
        host.set_state(StageState.JOINING, stage=target)
        try:
            await host.announce()
            await asyncio.sleep(host.rng.uniform(0.1, max(0.1, cfg.heartbeat.claim_jitter_s)))
            view = await host.routes.refresh()
            kept = keeps_claim(view, target, host.peer_id)
        except Exception as e:  # noqa: BLE001 - a failed write or read loses this round, not the node
            host.metrics.loop_errors.labels(loop="claim").inc()
            logger.warning("claim of stage %d: DHT call failed (%s: %s); retrying", target, type(e).__name__, e)
            kept = False
        if kept:
            logger.info("claimed stage %d", target)
            host.events.emit("claimed", stage=target)
            return Claim(target)
        logger.info("lost the race for stage %d; retrying", target)
        await retreat(host, target)
        host.set_state(StageState.STANDBY if announced_standby else StageState.JOINING, stage=None)
        await asyncio.sleep(host.rng.uniform(0.0, cfg.heartbeat.claim_jitter_s))


async def retreat(host: ClaimHost, stage: int) -> None:
    """Announce OFFLINE for a stage we claimed or held (best effort; a later expiration than our last
    heartbeat, so it replaces it and the stage reads as empty at once)."""
    host.set_state(StageState.OFFLINE, stage=stage)
    try:
        await host.store_own(stage, ttl_s=host.config.heartbeat.ttl_s + 1)
    except Exception as e:  # noqa: BLE001 - the record expires on its own
        logger.info("could not announce OFFLINE for stage %d: %s", stage, e)


CONFIRM_READS = 4


async def confirm_claim(host: ClaimHost, stage: int, *, fresh_build: bool) -> None:
    """After announcing RECOVERING (and rebuilding), before ONLINE: re-read and make sure no other claimant
    outranks us (a higher generation, or ours with a peer id that sorts first: two spares that did not see each
    other's JOINING). Raises RecoveryError to give the stage back."""
    await asyncio.sleep(host.config.heartbeat.claim_jitter_s)  # rival claims written before ours become visible
    for _ in range(CONFIRM_READS):  # a read that misses our own record may miss a rival's too: read again
        view = await host.routes.refresh()
        if any(p.peer_id == host.peer_id and p.record.generation == host.generation
               for p in host.routes.last_read.members(stage)):
            break
        await asyncio.sleep(host.config.heartbeat.claim_jitter_s / 2)
    else:
        raise RecoveryError(f"could not read our own claim of stage {stage} back; giving it back to be safe")
    if fresh_build and swarm_has_trained(view, host.config.model.num_stages, host.config.train.start_step):
        raise RecoveryError(f"the swarm trained while stage {stage} was built from the seeded init")
    rivals = claim_rivals(view, stage, host.peer_id, host.generation)
    if rivals:
        best = max(rivals, key=lambda p: (p.record.generation, -ord(p.peer_id[0])))
        host.events.emit("claim_lost", stage=stage, to=best.peer_id[:12], generation=best.record.generation)
        raise RecoveryError(f"stage {stage} is claimed by {best.peer_id[:12]} at generation "
                            f"{best.record.generation} (ours {host.generation})")


