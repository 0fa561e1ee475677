"""Node: one cfnode process. Composes the DHT records, the RPC servicer and client, the compute thread and
(on stage 0) the step driver; owns every long-lived task and tears them all down in one place.

Lifecycle: check the run's model-config hash -> claim a stage (JOINING + jitter + tie-break) or wait as
STANDBY -> build the stage (seeded init) -> ONLINE -> serve hops; stage 0 also drives training. Threads: the
asyncio loop (network, heartbeats, membership) and ONE compute thread that owns torch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from cfnode import membership, replication
from cfnode.clock import SYSTEM_CLOCK, Clock
from cfnode.config import NodeConfig
from cfnode.deadline import within
from cfnode.errors import (
    InvalidPayload,
    PeerUnavailableError,
    RecoveryError,
    UnrecoverableError,
)
from cfnode.hops import HopHandling
from cfnode.logs import EventLog, set_log_context
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.dht import SwarmStore
from cfnode.net.network import Endpoint, Network
from cfnode.net.records import (
    StageRecord,
    StageState,
    SwarmView,
)
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

logger = logging.getLogger(__name__)
T = TypeVar("T")
META_REFRESH_S = 60.0


class Node(HopHandling):
    """`swarm` is the DHT (net/dht.py `SwarmDHT`), `network` the RPC transport (net/network.py `P2PNetwork`);
    the protocol harness passes in-memory ones, a virtual `clock`, a seeded `rng` and an inline `executor`."""

    def __init__(self, config: NodeConfig, swarm: SwarmStore, network: Network, *, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, executor: Executor | None = None,
                 on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.run_id = config.run_id
        self.swarm = swarm
        self.network = network
        self.clock = clock
        self.rng = rng or random.Random()
        self.peer_id = self.swarm.peer_id
        self.metrics = NodeMetrics()
        for direction in ("forward", "backward"):
            for idx in range(config.model.num_stages + 1):
                self.metrics.hops_received.labels(direction=direction, from_stage=str(idx))
        self.events = EventLog(config.events_path, peer=self.peer_id[:12])
        set_log_context(peer=self.peer_id, stage=None, step=None)
        self.max_message_bytes = config.network.max_message_bytes
        self.max_replica_bytes = _max_stage_bytes(config) + 2**20  # the largest stage, plus framing
        self.chunk_bytes = config.network.chunk_bytes
        self.on_ready = on_ready
        self.compute_pool = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfnode-compute")
        self.endpoint: Endpoint | None = None
        self.stage: int | None = None
        self.state = StageState.JOINING
        self.generation = 0
        self.worker: StageWorker | None = None
        self.view = SwarmView()
        self.banned: dict[str, float] = {}
        self.client: StageClient | None = None
        self.driver: Any = None
        self.metrics_port: int | None = None
        self._view_refreshed_at = 0.0
        self._heartbeat_now = asyncio.Event()
        self._tasks: dict[asyncio.Task[Any], None] = {}  # ordered: teardown cancels in a replayable order
        self._seen_hops: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.stopped = asyncio.Event()
        self.stage_lost = asyncio.Event()
        self._meta_stored_at = clock.monotonic()
        self.lost_neighbours: set[int] = set()
        self.seen_neighbours: set[int] = set()  # neighbour stages seen ONLINE since this node went ONLINE
        self.unrecoverable_logged = False

    # -- helpers -----------------------------------------------------------------------------------------

    async def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run torch work on the single compute thread."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.compute_pool, call)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks[task] = None
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def own_record(self) -> StageRecord:
        w = self.worker
        return StageRecord(state=self.state, step=w.step if w else 0, generation=self.generation,
                           grad_norm=w.grad_norm if w else 1.0, grad_norm_raw=w.grad_norm_raw if w else 1.0,
                           donor=w.donor if w else True, replica_step=w.replica_step if w else -1)

    def serving_stage(self) -> int | None:
        return self.stage if self.state is StageState.ONLINE and self.worker is not None else None

    def hidden_shape(self) -> tuple[int, ...]:
        m, t = self.config.model, self.config.train
        return (t.microbatch_size, m.seq_len, m.hidden_size)

    def route(self, stage_idx: int) -> str:
        """The live ONLINE owner of a stage, or PeerUnavailableError."""
        owner = self.view.online_owner(stage_idx)
        if owner is None or self.banned.get(owner.peer_id, 0) > self.clock.time():
            raise PeerUnavailableError(f"stage {stage_idx} has no live owner")
        return owner.peer_id

    def ban(self, peer_id: str, reason: str) -> None:
        """Stop routing to a peer until its current record would expire."""
        # until its record expires, plus one membership period so the view has dropped it by then
        expiry = self.config.heartbeat.period_s + max(
            (p.expiration_time for ps in self.view.stages.values() for p in ps if p.peer_id == peer_id),
            default=self.clock.time() + self.config.heartbeat.ttl_s)
        if self.banned.get(peer_id, 0) < expiry:
            self.banned[peer_id] = expiry
            self.metrics.peer_bans.labels(reason=reason).inc()

    # -- membership --------------------------------------------------------------------------------------

    async def refresh_view(self) -> SwarmView:
        self.view = await self.swarm.read_view()
        self._view_refreshed_at = self.clock.monotonic()
        now = self.clock.time()
        self.banned = {p: t for p, t in self.banned.items() if t > now}
        online = sum(1 for i in range(self.config.model.num_stages + 1) if self.view.online_owner(i) is not None)
        self.metrics.swarm_stages_online.set(online)
        self.metrics.swarm_standby.set(len(self.view.standby))
        return self.view

    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None:
        owner = self.view.online_owner(stage_idx)
        if (owner is None or owner.peer_id != peer_id) and self.clock.monotonic() - self._view_refreshed_at > 0.3:
            await self.refresh_view()
            owner = self.view.online_owner(stage_idx)
        if owner is None or owner.peer_id != peer_id:
            raise InvalidPayload("unauthorized", f"sender is not the ONLINE owner of stage {stage_idx}")
        if owner.record.generation != generation:
            raise InvalidPayload("generation", f"sender claims generation {generation}, its record says "
                                               f"{owner.record.generation}")

    async def _membership_loop(self) -> None:
        period = self.config.heartbeat.period_s
        while True:
            try:
                await self.refresh_view()
                await self._on_view()
                self.metrics.dht_peers.set(await self.swarm.dht_peers())
            except (TimeoutError, asyncio.TimeoutError):
                logger.warning("membership read timed out; retrying")
            await asyncio.sleep(period)

    async def _on_view(self) -> None:
        membership.watch(self, self.view)
        if self.driver is not None and self.stage == 0:
            self.driver.on_view(self.view)

    def set_state(self, state: StageState, *, stage: int | None) -> None:
        self.state, self.stage = state, stage
        self.metrics.set_state(state.value.lower())
        self.metrics.stage_index.set(-1 if stage is None else stage)
        self.metrics.stage_generation.set(self.generation)
        set_log_context(stage=stage, step=self.worker.step if self.worker is not None else None)

    def fence(self) -> None:
        """Another peer holds our stage at a higher generation: stop serving it and become a spare again."""
        self.metrics.set_state("fenced")
        self.state = StageState.STANDBY
        self.worker = None
        self.stage_lost.set()

    # -- heartbeat ---------------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        period = self.config.heartbeat.period_s
        while True:
            started = self.clock.monotonic()
            try:
                await self.announce()
            except (TimeoutError, asyncio.TimeoutError):
                logger.warning("heartbeat store timed out")
            took = self.clock.monotonic() - started
            if took > period:
                logger.warning("heartbeat took %.2fs, longer than its period %.2fs", took, period)
            self._heartbeat_now.clear()
            try:
                await asyncio.wait_for(self._heartbeat_now.wait(), timeout=max(0.0, period - took))
            except (TimeoutError, asyncio.TimeoutError):
                pass

    async def announce(self) -> None:
        if self.clock.monotonic() - self._meta_stored_at > META_REFRESH_S:
            await membership.store_meta(self)  # keep {run}:meta alive for as long as the run has nodes
            self._meta_stored_at = self.clock.monotonic()
        record = self.own_record()
        stage = None if self.state is StageState.STANDBY else self.stage
        await self.swarm.store_stage(stage, record)
        self.metrics.last_announce.set(self.clock.time())

    def heartbeat_soon(self) -> None:
        self._heartbeat_now.set()

    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        worker = self.worker
        if worker is None or self.stage in (None, 0):
            raise InvalidPayload("not_ready", "no stage to commit")
        key = AttemptKey(meta["step"], meta["attempt"])
        try:
            norm, raw = await self.compute(worker.commit, key, meta["num_mb"])
        except ValueError as e:
            raise InvalidPayload("stale_step", str(e)) from e
        self.after_commit(norm, raw)
        reply = {"grad_norm": norm, "grad_norm_raw": raw, "step": worker.step}
        if self.config.recovery.mode == "redundant":  # the shadow on our predecessor follows every commit
            state = await self.compute(worker.snapshot)
            await replication.push_copies(self, state, replication.replica_meta(
                self, step=worker.step, grad_norm=norm, grad_norm_raw=raw))
        reply.update(await replication.save_checkpoint(self))
        return reply

    def after_commit(self, norm: float, raw: float) -> None:
        w = self.worker
        assert w is not None
        self.metrics.training_step.set(w.step)
        self.metrics.steps_committed.inc()
        self.metrics.grad_norm.set(norm)
        self.metrics.grad_norm_raw.set(raw)
        set_log_context(step=w.step)
        self.heartbeat_soon()

    async def accept_abort(self, meta: dict[str, Any], peer_id: str) -> None:
        if self.stage != 0 or self.driver is None:
            raise InvalidPayload("wrong_stage", "only stage 0 takes abort reports")
        self.driver.fail_attempt(AttemptKey(meta["step"], meta["attempt"]), "reported",
                                 f"stage {meta['from_stage']}: {meta['reason']}")
        suspect = meta.get("suspect_stage")
        if isinstance(suspect, int) and 0 < suspect <= self.config.model.num_stages:
            self.spawn(self._confirm_suspect(suspect), "confirm-suspect")

    async def _confirm_suspect(self, stage_idx: int) -> None:
        """A neighbour could not reach stage `stage_idx`: ping its owner ourselves; ban it if silent, so the
        driver waits for the ring instead of retrying into a dead peer until its record expires."""
        try:
            peer = self.route(stage_idx)
        except PeerUnavailableError:
            return
        if not await self.is_reachable(peer):
            self.ban(peer, "confirmed_dead")
            self.events.emit("neighbour_unreachable", stage=stage_idx, peer=peer[:12], confirmed_by="ping")

    async def weights_snapshot(self, replica: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This stage's weights, or (`replica`) the stage-0 replica it holds, with the metadata a rebuild checks."""
        worker = self.worker
        assert worker is not None
        if replica:
            return replication.replica_snapshot(self)
        state = await self.compute(worker.snapshot)
        meta = {"stage": self.stage, "step": worker.step, "generation": self.generation,
                "grad_norm": worker.grad_norm, "grad_norm_raw": worker.grad_norm_raw,
                "config_hash": self.config.model.config_hash()}
        return meta, state

    async def accept_replica(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        await replication.accept_replica(self, meta, state)

    async def accept_restore(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        return await replication.accept_restore(self, meta)

    def stage_shapes(self, stage_idx: int) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of a stage's state dict (what a copy of it must look like)."""
        from cfnode.model.stages import stage_shapes

        return stage_shapes(self.config.model, stage_idx)

    def info(self) -> dict[str, Any]:
        w = self.worker
        return {"peer_id": self.peer_id, "stage": self.stage, "state": self.state.value,
                "step": w.step if w else 0, "generation": self.generation,
                "grad_norm": w.grad_norm if w else 1.0, "grad_norm_raw": w.grad_norm_raw if w else 1.0,
                "replica_step": w.replica_step if w else -1,
                "config_hash": self.config.model.config_hash(), "version": 1}

    # -- run ---------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped: claim a stage (or wait as a spare), build or rebuild it, serve it; if fenced
        off it, start over. Stage 0 returns when its driver reaches --max-steps."""
        from cfnode.train.driver import Driver  # torch-heavy import after the DHT fork

        torch.set_num_threads(self.config.train.num_threads)
        await self.compute(_warm_up_optimizer)
        self.endpoint = endpoint = await self.network.open(self, self.metrics)
        self.client = endpoint.client
        if self.config.metrics.port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        self.metrics.node_info.labels(peer_id=self.peer_id, role="stage", run_id=self.run_id).set(1)
        self.metrics.learning_rate.set(self.config.train.lr)
        self.events.emit("joined", run_id=self.run_id, peer_id=self.peer_id, metrics_port=self.metrics_port)
        try:
            await membership.check_meta(self)
            self.spawn(self._heartbeat_loop(), "heartbeat")
            self.spawn(self._membership_loop(), "membership")
            while True:
                stage = await membership.claim_stage(self)
                try:
                    worker = await membership.acquire_stage(self, stage)
                except (RecoveryError, UnrecoverableError) as e:
                    logger.warning("giving stage %d back: %s", stage, e)
                    self.set_state(StageState.OFFLINE, stage=stage)
                    await self.announce()
                    self.set_state(StageState.JOINING, stage=None)
                    await asyncio.sleep(self.config.heartbeat.period_s)
                    continue
                self.worker = worker
                self.metrics.model_parameters.set(worker.num_parameters)
                if stage == 0:
                    self.driver = Driver(self)
                    await self.driver.prepare()
                self.lost_neighbours.clear()
                self._seen_hops.clear()  # hop ids are only unique per stage
                self.seen_neighbours.clear()
                self.stage_lost.clear()
                self.set_state(StageState.ONLINE, stage=stage)
                await self.announce()
                self.events.emit("online", stage=stage, generation=self.generation, step=worker.step)
                self._ready(endpoint.maddrs())
                if await self._serve_until_fenced():
                    return
        finally:
            await self.leave(endpoint)

    async def _serve_until_fenced(self) -> bool:
        """Serve the stage; True when stage 0's driver finished, False when the stage was taken from us."""
        fenced = asyncio.ensure_future(self.stage_lost.wait())
        waiters: set[asyncio.Future[Any]] = {fenced}
        if self.driver is not None and self.stage == 0:
            waiters.add(asyncio.ensure_future(self.driver.run()))
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        for w in done:
            if w is not fenced:
                w.result()  # re-raise a driver failure
                return True
        return False

    join_addr: str | None = None

    def _ready(self, maddrs: list[str]) -> None:
        self.join_addr = maddrs[0] if maddrs else None
        info = {"peer_id": self.peer_id, "maddrs": maddrs, "stage": self.stage, "run_id": self.run_id,
                "metrics_port": self.metrics_port, "generation": self.generation}
        logger.info("stage %s ONLINE as %s", self.stage, self.peer_id)
        if self.on_ready is not None:
            self.on_ready(info)

    async def leave(self, endpoint: Endpoint) -> None:
        """Graceful exit: announce OFFLINE (best effort), stop tasks and handlers, stop the compute thread."""
        for task in list(self._tasks):
            task.cancel()
        if self.stage is not None or self.state is StageState.STANDBY:
            self.state = StageState.OFFLINE
            try:
                await within(self.swarm.store_stage(
                    None if self.stage is None else self.stage, self.own_record(),
                    ttl_s=self.config.heartbeat.ttl_s + 1), 2)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.debug("could not announce OFFLINE: %s", e)
        await endpoint.close()
        self.compute_pool.shutdown(wait=False, cancel_futures=True)
        self.events.emit("left", stage=self.stage)


def _warm_up_optimizer() -> None:
    """The first torch.optim construction takes ~1 s; pay it before claiming a stage."""
    p = torch.nn.Parameter(torch.zeros(1))
    torch.optim.Adam([p], lr=1e-3).step()


def _max_stage_bytes(config: NodeConfig) -> int:
    """float32 bytes of the largest stage's state dict (stage 0 or a transformer stage)."""
    from cfnode.model.stages import stage_shapes

    return max(4 * sum(math.prod(shape) for shape in stage_shapes(config.model, idx).values())
               for idx in (0, min(1, config.model.num_stages)))
