"""Copies of a stage's state kept outside it: replicas and shadows pushed after each commit (`checkfree+`,
`redundant`; who keeps whose copy is `recovery/replicas.py`), and the checkpointing baseline's saves and
swarm-wide rollbacks (`checkpoint`; the store is `recovery/store.py`). The node's RPC handlers delegate here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from cfnode.errors import InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.recovery import store
from cfnode.recovery.replicas import replica_of, replica_targets

if TYPE_CHECKING:
    from cfnode.node import Node

logger = logging.getLogger(__name__)


# -- replicas and shadows ----------------------------------------------------------------------------------


def replica_meta(node: Node, *, step: int, grad_norm: float, grad_norm_raw: float) -> dict[str, Any]:
    assert node.stage is not None
    return {"run": node.run_id, "stage": node.stage, "step": step, "generation": node.generation,
            "grad_norm": grad_norm, "grad_norm_raw": grad_norm_raw,
            "config_hash": node.config.model.config_hash()}


async def push_copies(node: Node, state: dict[str, torch.Tensor], meta: dict[str, Any],
                      peers: dict[int, str] | None = None) -> list[tuple[int, BaseException]]:
    """Stream this stage's weights (as of its last commit) to every stage that keeps a copy; returns failures."""
    assert node.stage is not None and node.client is not None
    targets = replica_targets(node.stage, node.config.model.num_stages, node.config.recovery.mode)
    failures: list[tuple[int, BaseException]] = []
    calls, idxs = [], []
    for idx in targets:
        try:
            peer = peers[idx] if peers and idx in peers else node.route(idx)
        except PeerUnavailableError as e:
            failures.append((idx, e))
            continue
        calls.append(node.client.push_replica(peer, meta, state))
        idxs.append(idx)
    for idx, result in zip(idxs, await asyncio.gather(*calls, return_exceptions=True), strict=True):
        if isinstance(result, BaseException):
            failures.append((idx, result))
    for idx, err in failures:
        logger.warning("copy of stage %s for stage %d not delivered: %s", node.stage, idx, err)
        node.events.emit("replica_failed", to_stage=idx, step=meta["step"], error=str(err)[:200])
    return failures


async def accept_replica(node: Node, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Keep the copy of stage `meta["stage"]` pushed after its commit, if this stage is one of its keepers."""
    num, mode = node.config.model.num_stages, node.config.recovery.mode
    worker = node.worker
    of = meta["stage"]
    if worker is None or node.stage is None or replica_of(node.stage, num, mode) != of:
        raise InvalidPayload("wrong_stage", f"stage {node.stage} keeps no copy of stage {of} ({mode})")
    if meta["config_hash"] != node.config.model.config_hash():
        raise InvalidPayload("wrong_run", f"replica of model {meta['config_hash']}")
    expected = node.stage_shapes(of)
    if set(state) != set(expected):
        raise InvalidPayload("shape", f"replica tensors {sorted(state)[:4]} are not stage {of}'s")
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise InvalidPayload("shape", f"replica {name} is {tuple(t.shape)}, expected {expected[name]}")
        if t.dtype != torch.float32:
            raise InvalidPayload("dtype", f"replica {name} is {t.dtype}")
    bad = await node.compute(_first_nonfinite, state)  # torch math stays off the event loop
    if bad is not None:
        raise InvalidPayload("nonfinite", f"replica tensor {bad} contains NaN or Inf")
    norm, raw = float(meta["grad_norm"]), float(meta["grad_norm_raw"])
    if not await node.compute(worker.store_replica, state, step=meta["step"], grad_norm=norm, grad_norm_raw=raw):
        raise InvalidPayload("stale_step", f"replica of step {meta['step']} is older than the one held "
                                           f"({worker.replica_step})")
    node.metrics.replica_step.set(meta["step"])


def _first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    return next((name for name, t in state.items() if not bool(torch.isfinite(t).all())), None)


def replica_snapshot(node: Node) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    worker = node.worker
    assert worker is not None and node.stage is not None
    bundle = worker.held  # one read: weights, step and norms of the same push
    of = replica_of(node.stage, node.config.model.num_stages, node.config.recovery.mode)
    if bundle is None or of is None:
        raise InvalidPayload("not_ready", f"stage {node.stage} holds no copy of another stage")
    held, step, (norm, raw) = bundle
    return {"stage": of, "step": step, "generation": -1, "grad_norm": norm, "grad_norm_raw": raw,
            "config_hash": node.config.model.config_hash(), "holder": node.stage}, held


# -- the checkpoint baseline -------------------------------------------------------------------------------


def checkpoint_root(node: Node) -> str:
    """This run's part of the store: `--checkpoint-dir/RUN-HASH`, so a reused directory never mixes runs or
    models."""
    cfg = node.config
    assert cfg.recovery.checkpoint_dir is not None
    return os.path.join(cfg.recovery.checkpoint_dir, f"{cfg.run_id}-{cfg.model.config_hash()}")


async def save_checkpoint(node: Node) -> dict[str, Any]:
    """After a commit: save this stage (weights + Adam) if its new step is a checkpoint step. Synchronous with
    the commit, so the save time is part of the step time, as it is for a real checkpointing system."""
    cfg, worker = node.config.recovery, node.worker
    assert worker is not None and node.stage is not None
    if cfg.mode != "checkpoint" or not store.is_checkpoint_step(worker.step, cfg.checkpoint_every):
        return {}
    payload = await node.compute(worker.checkpoint_payload)
    try:
        _, seconds, size = await asyncio.to_thread(store.save_stage, checkpoint_root(node), worker.step, node.stage,
                                                   payload)
    except OSError as e:
        logger.error("could not save the checkpoint of step %d: %s", worker.step, e)
        return {}
    node.events.emit("checkpoint_saved", stage=node.stage, step=worker.step, save_s=round(seconds, 4), bytes=size)
    return {"checkpoint_step": worker.step, "checkpoint_s": round(seconds, 4)}


async def restore_checkpoint(node: Node, step: int, attempt_floor: int = -1) -> float:
    """Roll this stage back to the checkpoint of `step` (0: the seeded initial weights); returns seconds."""
    from cfnode.model.stages import build_stage

    worker = node.worker
    assert worker is not None and node.stage is not None
    started = time.perf_counter()
    if step == 0:
        fresh = (await node.compute(build_stage, node.config.model, node.stage, node.config.model_path)).state_dict()
        await node.compute(worker.restore, None, step=0, fresh=fresh, attempt_floor=attempt_floor)
    else:
        payload = await asyncio.to_thread(store.load_stage, checkpoint_root(node), step, node.stage)
        await node.compute(worker.restore, payload, step=step, fresh={}, attempt_floor=attempt_floor)
    took = time.perf_counter() - started
    node.metrics.training_step.set(worker.step)
    node.heartbeat_soon()
    return took


async def accept_restore(node: Node, meta: dict[str, Any]) -> dict[str, Any]:
    """rpc_restore from stage 0: the swarm rolls back to the checkpoint of `meta["to_step"]`."""
    if node.config.recovery.mode != "checkpoint":
        raise InvalidPayload("wrong_stage", "this run does not use checkpoints")
    if node.worker is None or node.stage in (None, 0):
        raise InvalidPayload("not_ready", "no stage to restore")
    step = meta["to_step"]
    root = checkpoint_root(node)
    if step != 0 and (root is None or step > store.latest_complete(root)):
        raise InvalidPayload("stale_step", f"no complete checkpoint of step {step}")
    try:
        took = await restore_checkpoint(node, step, attempt_floor=meta["attempt_floor"])
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise InvalidPayload("not_ready", f"cannot load the checkpoint of step {step}: {e}") from e
    node.events.emit("restored", stage=node.stage, step=step, restore_s=round(took, 4))
    return {"step": step, "restore_s": round(took, 4)}


async def rollback_swarm(node: Node, to_step: int, from_step: int, attempt_floor: int) -> dict[str, Any]:
    """Stage 0: every stage (itself included) loads the checkpoint of `to_step` and ignores attempts up to
    `attempt_floor` from then on; raises RejectedError if any stage fails."""
    assert node.client is not None and node.worker is not None
    num = node.config.model.num_stages
    started = time.perf_counter()
    peers = {idx: node.route(idx) for idx in range(1, num + 1)}
    meta = {"run": node.run_id, "to_step": to_step, "generation": node.generation, "attempt_floor": attempt_floor}
    local = asyncio.ensure_future(restore_checkpoint(node, to_step, attempt_floor))
    results = await asyncio.gather(*(node.client.restore(p, meta) for p in peers.values()), return_exceptions=True)
    try:
        await local
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise RejectedError("not_ready", f"stage 0 could not load the checkpoint of step {to_step}: {e}") from e
    failed = [(idx, r) for idx, r in zip(peers, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        raise RejectedError("not_ready", f"stage {failed[0][0]} could not roll back: {failed[0][1]}")
    took = time.perf_counter() - started
    info = {"from_step": from_step, "to_step": to_step, "steps_lost": max(0, from_step - to_step),
            "restore_s": round(took, 4)}
    logger.warning("rolled the swarm back from step %d to the checkpoint of step %d in %.2fs", from_step, to_step,
                   took)
    node.events.emit("rollback", **info)
    return info
