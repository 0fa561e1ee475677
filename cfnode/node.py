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
from cfnode.config import PROTOCOL_VERSION, NodeConfig
from cfnode.deadline import within
from cfnode.errors import (
    CfnodeError,
    InvalidPayload,
    PeerUnavailableError,
    RecoveryError,
    RejectedError,
    UnrecoverableError,
)
from cfnode.hops import HopHandling
from cfnode.logs import EventLog, set_log_context
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.dht import SwarmStore
from cfnode.net.network import Endpoint, Network
from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView
from cfnode.routes import RouteTable
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import NonFiniteGradient, StageWorker, worker_holds

logger = logging.getLogger(__name__)
T = TypeVar("T")
META_REFRESH_S = 60.0
EXPIRATION_STEP_S = 0.05


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
        self.routes = RouteTable(swarm, clock, config.heartbeat, self.metrics, config.model.num_stages,
                                 own=self._own_peer_record)
        self.client: StageClient | None = None
        self.driver: Any = None
        self.metrics_port: int | None = None
        self._heartbeat_now = asyncio.Event()
        self._tasks: dict[asyncio.Task[Any], None] = {}  # ordered: teardown cancels in a replayable order
        self._seen_hops: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.stopped = asyncio.Event()
        self.stage_lost = asyncio.Event()
        self._meta_stored_at = clock.monotonic()
        self.lost_neighbours: set[int] = set()
        self.seen_neighbours: set[int] = set()  # neighbour stages seen ONLINE since this node went ONLINE
        self.unrecoverable_logged = False
        self.last_stage0_peer: str | None = None
        self._expirations: dict[int | None, float] = {}
        self._commits: dict[AttemptKey, asyncio.Future[dict[str, Any]]] = {}
        """Replies to applied commits by attempt (the last few), so a retried commit is answered again."""

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
        known = self.routes.generations
        return StageRecord(state=self.state, step=w.step if w else 0, generation=self.generation,
                           grad_norm=w.grad_norm if w else 1.0, grad_norm_raw=w.grad_norm_raw if w else 1.0,
                           donor=w.donor if w else True, replica_step=w.replica_step if w else -1,
                           generations=tuple(known.get(i, 0) for i in range(self.config.model.num_stages + 1)))

    def _own_peer_record(self) -> tuple[int | None, PeerRecord | None]:
        if self.stage is None or self.state is StageState.STANDBY:
            return None, None
        expires = self.clock.time() + self.config.heartbeat.ttl_s
        return self.stage, PeerRecord(peer_id=self.peer_id, record=self.own_record(), expiration_time=expires)

    @property
    def view(self) -> SwarmView:
        return self.routes.view

    def serving_stage(self) -> int | None:
        return self.stage if self.state is StageState.ONLINE and self.worker is not None else None

    def hidden_shape(self) -> tuple[int, ...]:
        m, t = self.config.model, self.config.train
        return (t.microbatch_size, m.seq_len, m.hidden_size)

    def route(self, stage_idx: int) -> str:
        """The live ONLINE owner of a stage, or PeerUnavailableError."""
        return self.routes.route(stage_idx)

    def ban(self, peer_id: str, reason: str) -> None:
        self.routes.ban(peer_id, reason)

    # -- membership --------------------------------------------------------------------------------------

    async def refresh_view(self) -> SwarmView:
        """A fresh view if the DHT answers, else the previous one (never raises on a DHT error)."""
        return await self.routes.refresh_or_keep()

    async def check_sender(self, peer_id: str, stage_idx: int, generation: int) -> None:
        await self.routes.check_sender(peer_id, stage_idx, generation)

    async def may_fetch_weights(self, peer_id: str, uid: str) -> bool:
        """Ring members (any live stage record), spares and the operator's --weights-reader peers may fetch a
        stage's weights or the replica it holds; nobody else."""
        return peer_id in self.config.network.weights_readers or await self.routes.is_member(peer_id)

    def replica_bytes(self, of_stage: int) -> int:
        """float32 bytes of stage `of_stage`'s state dict: the cap of a replica push of it (framing excluded)."""
        return _stage_bytes(self.config, of_stage)

    async def _membership_loop(self) -> None:
        """Read the view every period and act on it; survives any error (logged, counted, backed off)."""
        period = self.config.heartbeat.period_s
        failures = 0
        while True:
            try:
                before = self.routes.failed_reads
                await self.refresh_view()
                if self.routes.failed_reads == before:  # act only on a read that happened
                    await self._on_view()
                    self.metrics.dht_peers.set(await self.swarm.dht_peers())
                failures = 0
            except Exception as e:  # noqa: BLE001 - the loop must outlive any single failure
                failures += 1
                self.metrics.loop_errors.labels(loop="membership").inc()
                logger.warning("membership update failed (%s: %s); retrying", type(e).__name__, e)
            await asyncio.sleep(period * min(4, 1 + failures))

    async def _on_view(self) -> None:
        await membership.watch(self, self.view)
        if self.driver is not None and self.stage == 0:
            self.driver.on_view(self.view)

    def set_state(self, state: StageState, *, stage: int | None) -> None:
        self.state, self.stage = state, stage
        self.metrics.set_state(state.value.lower())
        self.metrics.stage_index.set(-1 if stage is None else stage)
        self.metrics.stage_generation.set(self.generation)
        set_log_context(stage=stage, step=self.worker.step if self.worker is not None else None)

    def fence(self) -> None:
        """Our stage is not ours to serve any more (another owner, or we missed a commit): stop serving it at
        once and become a spare again (the run loop announces OFFLINE for it and claims anew)."""
        self.metrics.set_state("fenced")
        self.state = StageState.STANDBY
        self.worker = None
        self.stage_lost.set()

    # -- heartbeat ---------------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Announce our record every period; a failed store is retried after a quarter period, so a stuck call
        (bounded by the DHT call timeout, ttl/3) never lets the record expire. Survives any error."""
        period = self.config.heartbeat.period_s
        while True:
            started = self.clock.monotonic()
            wait = period
            try:
                await self.announce()
            except Exception as e:  # noqa: BLE001 - the heartbeat must outlive any single failure
                self.metrics.loop_errors.labels(loop="heartbeat").inc()
                logger.warning("heartbeat store failed (%s: %s); retrying soon", type(e).__name__, e)
                wait = period / 4
            took = self.clock.monotonic() - started
            if took > period:
                logger.warning("heartbeat took %.2fs, longer than its period %.2fs", took, period)
            self._heartbeat_now.clear()
            try:
                # `within`, not wait_for: in 3.11 wait_for swallows a cancellation that arrives as the event is set
                await within(self._heartbeat_now.wait(), max(0.0, wait - took))
            except (TimeoutError, asyncio.TimeoutError):
                pass

    async def announce(self) -> None:
        if self.clock.monotonic() - self._meta_stored_at > META_REFRESH_S:
            await membership.store_meta(self)  # keep {run}:meta alive for as long as the run has nodes
            self._meta_stored_at = self.clock.monotonic()
        await self.store_own(None if self.state is StageState.STANDBY else self.stage)
        self.metrics.last_announce.set(self.clock.time())

    async def store_own(self, stage: int | None, *, ttl_s: float | None = None) -> bool:
        """Write our record under `stage` (None: the standby key). Its expiration is always later than the last
        one we wrote there: the DHT refuses an earlier one, so after an OFFLINE written for ttl + 1 a plain
        heartbeat would silently not land."""
        ttl = self.config.heartbeat.ttl_s if ttl_s is None else ttl_s
        now = self.clock.time()
        ttl = max(ttl, self._expirations.get(stage, 0.0) - now + EXPIRATION_STEP_S)
        stored = await self.swarm.store_stage(stage, self.own_record(), ttl_s=ttl)
        if stored:
            self._expirations[stage] = now + ttl
        else:
            logger.warning("the DHT refused our record for %s", "standby" if stage is None else f"stage {stage}")
        return stored

    def heartbeat_soon(self) -> None:
        self._heartbeat_now.set()

    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        """Stage 0's two-phase commit (docs/protocol.md). `prepare`: all backward passes of the attempt are in;
        clip and report the norms (nothing applied; a non-finite norm is `nonfinite_grad`). `apply`: the Adam step
        (or, with `skip`, the step passes without an update everywhere). Both are idempotent: an attempt already
        prepared or applied is answered again with the same result, so stage 0 retries until every stage
        confirmed."""
        worker = self.worker
        if worker is None or self.stage in (None, 0):
            raise InvalidPayload("not_ready", "no stage to commit")
        key = AttemptKey(meta["step"], meta["attempt"])
        num_mb = self.config.train.num_microbatches
        if meta["num_mb"] != num_mb:
            raise InvalidPayload("decode", f"commit of {meta['num_mb']} microbatches, this run has {num_mb}")
        if meta.get("phase") == "prepare":
            self.check_step(worker, key)
            try:
                norm, raw = await self.compute(worker.prepare, key, num_mb)
            except NonFiniteGradient as e:
                raise InvalidPayload("nonfinite_grad", str(e)) from e
            except ValueError as e:
                raise InvalidPayload("stale_step", str(e), holds=worker_holds(worker)) from e
            return {"grad_norm": norm, "grad_norm_raw": raw, "step": worker.step}
        pending = self._commits.get(key)
        if pending is not None:  # a retry: the same answer, also while the first call still runs
            return await asyncio.shield(pending)
        if key.step > worker.step:
            self.check_step(worker, key)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._commits[key] = fut
        while len(self._commits) > 4:
            self._commits.pop(next(iter(self._commits)))
        try:
            reply = await self._apply_commit(worker, key, skip=bool(meta.get("skip", False)))
        except BaseException as e:
            self._commits.pop(key, None)
            fut.set_exception(e)
            fut.exception()  # retrieved: a concurrent retry re-raises it, nobody else must
            raise
        fut.set_result(reply)
        return reply

    async def _apply_commit(self, worker: StageWorker, key: AttemptKey, *, skip: bool) -> dict[str, Any]:
        try:
            norm, raw = await self.compute(worker.apply, key, skip=skip)
        except ValueError as e:
            raise InvalidPayload("stale_step", str(e), holds=worker_holds(worker)) from e
        self.after_commit(worker.grad_norm, worker.grad_norm_raw)
        reply = {"grad_norm": norm, "grad_norm_raw": raw, "step": worker.step, "skipped": skip}
        if self.config.recovery.mode == "redundant" and not skip:  # the shadow on our predecessor follows
            state = await self.compute(worker.snapshot)
            await replication.push_copies(self, state, replication.replica_meta(
                self, step=worker.step, grad_norm=norm, grad_norm_raw=raw))
        reply.update(await replication.save_checkpoint(self))
        return reply

    def check_step(self, worker: StageWorker, key: AttemptKey) -> None:
        """A message for step `key.step` must be for the step this stage is at: an older one is stale (the reply
        says what we hold, so the sender can adopt it); a newer one means stage 0 committed a step we never
        applied: we refuse it, and once stage 0 confirms it moved on we step down to be rebuilt rather than
        train on with a skipped update."""
        if key.step < worker.step or key.attempt <= worker.attempt_floor:
            raise InvalidPayload("stale_step", f"attempt {tuple(key)} is for step {key.step}, this stage has "
                                               f"committed {worker.step} steps (or it predates a rollback)",
                                 holds=worker_holds(worker))
        if key.step > worker.step:
            if not self._behind_check_running:
                self._behind_check_running = True
                self.spawn(self._confirm_behind(worker), "confirm-behind")
            raise InvalidPayload("behind", f"attempt {tuple(key)} is for step {key.step}; this stage has only "
                                           f"committed {worker.step} steps")

    _behind_check_running = False

    async def _confirm_behind(self, worker: StageWorker) -> None:
        """Ask stage 0 (not the neighbour that sent the hop) how many steps it committed; step down if more than
        we did."""
        try:
            assert self.client is not None
            info = await self.client.info(self.route(0))
            theirs = info.get("step")
            if isinstance(theirs, int) and theirs > worker.step and self.worker is worker:
                logger.warning("stage 0 committed %d steps, this stage only %d (a commit was lost); stepping "
                               "down so that the stage is rebuilt", theirs, worker.step)
                self.events.emit("behind", stage=self.stage, step=worker.step, stage0_step=theirs)
                self.fence()
        except (PeerUnavailableError, RejectedError) as e:
            logger.info("could not confirm with stage 0 that this stage is behind: %s", e)
        finally:
            self._behind_check_running = False

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
        holds = meta.get("holds")
        if isinstance(holds, list) and len(holds) == 2 and all(type(h) is int for h in holds):
            self.driver.adopt((holds[0], holds[1]))
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
                "commit_norms": ({str(i): list(v) for i, v in self.driver.commit_norms.items()}
                                 if self.driver is not None and self.stage == 0 else {}),
                "config_hash": self.config.model.config_hash(), "version": PROTOCOL_VERSION}

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
            await self._check_meta()
            self.spawn(self._heartbeat_loop(), "heartbeat")
            self.spawn(self._membership_loop(), "membership")
            while True:
                self.driver = None
                stage = await membership.claim_stage(self)
                try:
                    worker = await membership.acquire_stage(self, stage)
                    if stage == 0:
                        self.driver = Driver(self)
                        await self.driver.prepare()
                    await membership.confirm_claim(self, stage, fresh_build=worker.step == 0)  # the unique claimant
                except Exception as e:  # noqa: BLE001 - RecoveryError, a rival claim, a DHT failure: retry
                    if not isinstance(e, (RecoveryError, UnrecoverableError)):
                        self.metrics.loop_errors.labels(loop="claim").inc()
                    logger.warning("giving stage %d back: %s: %s", stage, type(e).__name__, e)
                    await membership.retreat(self, stage)
                    self.driver = None
                    self.set_state(StageState.JOINING, stage=None)
                    await asyncio.sleep(self.config.heartbeat.period_s)
                    continue
                self.worker = worker
                self.metrics.model_parameters.set(worker.num_parameters)
                self.lost_neighbours.clear()
                self._seen_hops.clear()  # hop ids are only unique per stage
                self.seen_neighbours.clear()
                self.stage_lost.clear()
                self.set_state(StageState.ONLINE, stage=stage)
                try:
                    await self.announce()
                except Exception as e:  # noqa: BLE001 - the heartbeat loop announces again soon
                    logger.warning("announcing ONLINE failed (%s); the heartbeat retries", e)
                self.events.emit("online", stage=stage, generation=self.generation, step=worker.step)
                self._ready(endpoint.maddrs())
                if await self._serve_until_fenced():
                    return
                await membership.retreat(self, stage)  # stepped down: the stage reads as ours no more
        finally:
            await self.leave(endpoint)

    async def _check_meta(self) -> None:
        """The run's settings check, retried while the DHT fails (a mismatch is final: exit 2)."""
        while True:
            try:
                await membership.check_meta(self)
                return
            except CfnodeError:
                raise
            except Exception as e:  # noqa: BLE001 - a DHT failure delays the start, it does not end the node
                self.metrics.loop_errors.labels(loop="claim").inc()
                logger.warning("reading the run's settings failed (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(self.config.heartbeat.period_s)

    async def _serve_until_fenced(self) -> bool:
        """Serve the stage; True when stage 0's driver finished, False when the stage was taken from us."""
        fenced = asyncio.ensure_future(self.stage_lost.wait())
        waiters: list[asyncio.Future[Any]] = [fenced]  # a list: cancelled in a replayable order
        if self.driver is not None and self.stage == 0:
            waiters.append(asyncio.ensure_future(self.driver.run()))
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        for w in waiters:
            if w in done and w is not fenced:
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
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)  # none of them may write after the OFFLINE below
        if self.stage is not None or self.state is StageState.STANDBY:
            self.state = StageState.OFFLINE
            try:
                await within(self.store_own(self.stage, ttl_s=self.config.heartbeat.ttl_s + 1), 2)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.debug("could not announce OFFLINE: %s", e)
        await endpoint.close()
        self.compute_pool.shutdown(wait=False, cancel_futures=True)
        self.events.emit("left", stage=self.stage)


def _warm_up_optimizer() -> None:
    """The first torch.optim construction takes ~1 s; pay it before claiming a stage."""
    p = torch.nn.Parameter(torch.zeros(1))
    torch.optim.Adam([p], lr=1e-3).step()


def _stage_bytes(config: NodeConfig, stage_idx: int) -> int:
    """float32 bytes of one stage's state dict."""
    from cfnode.model.stages import stage_shapes

    return 4 * sum(math.prod(shape) for shape in stage_shapes(config.model, stage_idx).values())


def _max_stage_bytes(config: NodeConfig) -> int:
    """float32 bytes of the largest stage's state dict (stage 0 or a transformer stage)."""
    return max(_stage_bytes(config, idx) for idx in (0, min(1, config.model.num_stages)))
