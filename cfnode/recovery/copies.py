"""Copies of a stage's state kept outside it: replicas and shadows pushed after each commit (`checkfree+`,
`redundant`; who keeps whose copy is `recovery/replicas.py`), and the checkpointing baseline's saves and
swarm-wide rollbacks (`checkpoint`; the store is `recovery/store.py`). The node's commit and RPC handlers
and stage 0's driver call these with the node seen as a `CopyHost`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from cfnode.errors import InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.recovery import store
from cfnode.recovery.replicas import replica_of, replica_targets

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.metrics import NodeMetrics
    from cfnode.net.client import StageClient
    from cfnode.train.worker import StageWorker

T = TypeVar("T")

logger = logging.getLogger(__name__)


class CopyHost(Protocol):
    """What copies and checkpoints need from the node: the stage it holds, its compute thread and its client."""

    config: NodeConfig
    run_id: str
    events: EventLog
    metrics: NodeMetrics
    stage: int | None
    generation: int
    worker: StageWorker | None
    client: StageClient | None

    async def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...
    def route(self, stage_idx: int) -> str: ...
    def heartbeat_soon(self) -> None: ...
    def stage_shapes(self, stage_idx: int) -> dict[str, tuple[int, ...]]: ...


# -- replicas and shadows ----------------------------------------------------------------------------------


def replica_meta(host: CopyHost, *, step: int, grad_norm: float, grad_norm_raw: float) -> dict[str, Any]:
    assert host.stage is not None
    return {"run": host.run_id, "stage": host.stage, "step": step, "generation": host.generation,
            "grad_norm": grad_norm, "grad_norm_raw": grad_norm_raw,
            "config_hash": host.config.model.config_hash()}


async def push_copies(host: CopyHost, state: dict[str, torch.Tensor], meta: dict[str, Any],
                      peers: dict[int, str] | None = None,
                      to: tuple[int, ...] | None = None) -> list[tuple[int, BaseException]]:
    """Stream this stage's weights (as of its last commit) to the stages `to` (default: every stage that keeps a
    copy); returns failures."""
    assert host.stage is not None and host.client is not None
    targets = to if to is not None else replica_targets(host.stage, host.config.model.num_stages,
                                                        host.config.recovery.mode)
    failures: list[tuple[int, BaseException]] = []
    calls, idxs = [], []
    for idx in targets:
        try:
            peer = peers[idx] if peers and idx in peers else host.route(idx)
        except PeerUnavailableError as e:
            failures.append((idx, e))
            continue
        calls.append(host.client.push_replica(peer, meta, state))
        idxs.append(idx)
    for idx, result in zip(idxs, await asyncio.gather(*calls, return_exceptions=True), strict=True):
        if isinstance(result, BaseException):
            failures.append((idx, result))
    for idx, err in failures:
        logger.warning("copy of stage %s for stage %d not delivered: %s", host.stage, idx, err)
        host.events.emit("replica_failed", to_stage=idx, step=meta["step"], error=str(err)[:200])
    return failures


async def accept_replica(host: CopyHost, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Keep the copy of stage `meta["stage"]` pushed after its commit, if this stage is one of its keepers."""
    num, mode = host.config.model.num_stages, host.config.recovery.mode
    worker = host.worker
    of = meta["stage"]
    if worker is None or host.stage is None or replica_of(host.stage, num, mode) != of:
        raise InvalidPayload("wrong_stage", f"stage {host.stage} keeps no copy of stage {of} ({mode})")
    if meta["config_hash"] != host.config.model.config_hash():
        raise InvalidPayload("wrong_run", f"replica of model {meta['config_hash']}")
    expected = host.stage_shapes(of)
    if set(state) != set(expected):
        raise InvalidPayload("shape", f"replica tensors {sorted(state)[:4]} are not stage {of}'s")
    for name, t in state.items():
        if tuple(t.shape) != expected[name]:
            raise InvalidPayload("shape", f"replica {name} is {tuple(t.shape)}, expected {expected[name]}")
        if t.dtype != torch.float32:
            raise InvalidPayload("dtype", f"replica {name} is {t.dtype}")
    bad = await host.compute(_first_nonfinite, state)  # torch math stays off the event loop
    if bad is not None:
        raise InvalidPayload("nonfinite", f"replica tensor {bad} contains NaN or Inf")
    norm, raw = float(meta["grad_norm"]), float(meta["grad_norm_raw"])
    if not await host.compute(worker.store_replica, state, step=meta["step"], grad_norm=norm, grad_norm_raw=raw):
        raise InvalidPayload("stale_step", f"replica of step {meta['step']} is older than the one held "
                                           f"({worker.replica_step})")
    host.metrics.replica_step.set(meta["step"])


def _first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    return next((name for name, t in state.items() if not bool(torch.isfinite(t).all())), None)


def replica_snapshot(host: CopyHost) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    worker = host.worker
    assert worker is not None and host.stage is not None
    bundle = worker.held  # one read: weights, step and norms of the same push
    of = replica_of(host.stage, host.config.model.num_stages, host.config.recovery.mode)
    if bundle is None or of is None:
        raise InvalidPayload("not_ready", f"stage {host.stage} holds no copy of another stage")
    held, step, (norm, raw) = bundle
    return {"stage": of, "step": step, "generation": -1, "grad_norm": norm, "grad_norm_raw": raw,
            "config_hash": host.config.model.config_hash(), "holder": host.stage}, held


# -- the checkpoint baseline -------------------------------------------------------------------------------


def checkpoint_root(host: CopyHost) -> str:
    """This run's part of the store: `--checkpoint-dir/RUN-HASH`, so a reused directory never mixes runs or
    models."""
    cfg = host.config
    assert cfg.recovery.checkpoint_dir is not None
    return os.path.join(cfg.recovery.checkpoint_dir, f"{cfg.run_id}-{cfg.model.config_hash()}")


async def save_checkpoint(host: CopyHost) -> dict[str, Any]:
    """After a commit: save this stage (weights + Adam) if its new step is a checkpoint step. Synchronous with
    the commit, so the save time is part of the step time, as it is for a real checkpointing system."""
    cfg, worker = host.config.recovery, host.worker
    assert worker is not None and host.stage is not None
    if cfg.mode != "checkpoint" or not store.is_checkpoint_step(worker.step, cfg.checkpoint_every):
        return {}
    payload = await host.compute(worker.checkpoint_payload)
    try:
        _, seconds, size = await asyncio.to_thread(store.save_stage, checkpoint_root(host), worker.step, host.stage,
                                                   payload)
    except OSError as e:
        logger.error("could not save the checkpoint of step %d: %s", worker.step, e)
        return {}
    host.events.emit("checkpoint_saved", stage=host.stage, step=worker.step, save_s=round(seconds, 4), bytes=size)
    return {"checkpoint_step": worker.step, "checkpoint_s": round(seconds, 4)}


async def restore_checkpoint(host: CopyHost, step: int, attempt_floor: int = -1) -> float:
    """Roll this stage back to the checkpoint of `step` (0: the seeded initial weights); returns seconds."""
    from cfnode.model.stages import build_stage

    worker = host.worker
    assert worker is not None and host.stage is not None
    started = time.perf_counter()
    if step == 0:
        fresh = (await host.compute(build_stage, host.config.model, host.stage, host.config.model_path)).state_dict()
        await host.compute(worker.restore, None, step=0, fresh=fresh, attempt_floor=attempt_floor)
    else:
        payload = await asyncio.to_thread(store.load_stage, checkpoint_root(host), step, host.stage)
        await host.compute(worker.restore, payload, step=step, fresh={}, attempt_floor=attempt_floor)
    took = time.perf_counter() - started
    host.metrics.training_step.set(worker.step)
    host.heartbeat_soon()
    return took


async def accept_restore(host: CopyHost, meta: dict[str, Any]) -> dict[str, Any]:
    """rpc_restore from stage 0: the swarm rolls back to the checkpoint of `meta["to_step"]`."""
    if host.config.recovery.mode != "checkpoint":
        raise InvalidPayload("wrong_stage", "this run does not use checkpoints")
    if host.worker is None or host.stage in (None, 0):
        raise InvalidPayload("not_ready", "no stage to restore")
    step = meta["to_step"]
    root = checkpoint_root(host)
    if step != 0 and (root is None or step > store.latest_complete(root)):
        raise InvalidPayload("stale_step", f"no complete checkpoint of step {step}")
    try:
        took = await restore_checkpoint(host, step, attempt_floor=meta["attempt_floor"])
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise InvalidPayload("not_ready", f"cannot load the checkpoint of step {step}: {e}") from e
    host.events.emit("restored", stage=host.stage, step=step, restore_s=round(took, 4))
    return {"step": step, "restore_s": round(took, 4)}


async def rollback_swarm(host: CopyHost, to_step: int, from_step: int, attempt_floor: int) -> dict[str, Any]:
    """Stage 0: every stage (itself included) loads the checkpoint of `to_step` and ignores attempts up to
    `attempt_floor` from then on; raises RejectedError if any stage fails."""
    assert host.client is not None and host.worker is not None
    num = host.config.model.num_stages
    started = time.perf_counter()
    peers = {idx: host.route(idx) for idx in range(1, num + 1)}
    meta = {"run": host.run_id, "to_step": to_step, "generation": host.generation, "attempt_floor": attempt_floor}
    local = asyncio.ensure_future(restore_checkpoint(host, to_step, attempt_floor))
    results = await asyncio.gather(*(host.client.restore(p, meta) for p in peers.values()), return_exceptions=True)
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
    host.events.emit("rollback", **info)
    return info
