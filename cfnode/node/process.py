"""Node: one cfnode process. Composes its parts (announcer.py: its own record; routes.py: who owns what;
claim.py and rebuild.py: getting a stage; watch.py: reacting to views; commits.py and hops.py: serving it;
stage 0's driver), the RPC endpoint and the compute thread; owns every long-lived task and tears them all down
in one place. The parts see the node through small Protocols (`ClaimHost`, `CommitHost`, `DriverHost`, ...).

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

from cfnode.clock import SYSTEM_CLOCK, Clock
from cfnode.config import PROTOCOL_VERSION, NodeConfig
from cfnode.deadline import within
from cfnode.errors import CfnodeError, InvalidPayload, RecoveryError, UnrecoverableError
from cfnode.logs import EventLog, set_log_context
from cfnode.metrics import NodeMetrics
from cfnode.net.client import StageClient
from cfnode.net.dht import SwarmStore
from cfnode.net.network import Endpoint, Network
from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView
from cfnode.node import claim, join, rebuild
from cfnode.node.announcer import Announcer
from cfnode.node.commits import CommitHandler
from cfnode.node.hops import HopHandling
from cfnode.node.lead import Stage0Lead
from cfnode.node.routes import RouteTable
from cfnode.node.watch import Watch
from cfnode.recovery import copies
from cfnode.train.averaging import (
    AveragerFactory,
    AveragingError,
    GroupAverager,
    HivemindAverager,
    averaging_prefix,
)
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Node(HopHandling):
    """`swarm` is the DHT (net/dht.py `SwarmDHT`), `network` the RPC transport (net/network.py `P2PNetwork`);
    the protocol harness passes in-memory ones, a virtual `clock`, a seeded `rng`, an inline `executor` and an
    in-memory all-reduce (`averagers`; default: hivemind's, over the swarm's DHT)."""

    def __init__(self, config: NodeConfig, swarm: SwarmStore, network: Network, *, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None, executor: Executor | None = None,
                 averagers: AveragerFactory | None = None,
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
        self.joined_from = ""
        """Stage groups: the member whose exact state we copied to join our group ("" if we built the stage)."""
        self.worker: StageWorker | None = None
        self.routes = RouteTable(swarm, clock, config.heartbeat, self.metrics, config.model.num_stages,
                                 own=self._own_peer_record)
        self.client: StageClient | None = None
        self.driver: Any = None
        self.driving = False
        """Stage 0: this node's driver runs (the lead of stage 0's group; a follower waits to take over)."""
        self.metrics_port: int | None = None
        self.announcer = Announcer(swarm, clock, config.heartbeat, self.metrics, seat=self,
                                   store_meta=lambda: claim.store_meta(self))
        self.watch = Watch(self)
        self.commits = CommitHandler(self)
        self.lead = Stage0Lead(self)
        self._tasks: dict[asyncio.Task[Any], None] = {}  # ordered: teardown cancels in a replayable order
        self._seen_hops: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.stopped = asyncio.Event()
        self.stage_lost = asyncio.Event()
        self._averager: tuple[int, GroupAverager] | None = None
        dht = getattr(swarm, "dht", None)
        self._averagers = averagers or (HivemindAverager.over(dht) if dht is not None else None)

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
                           throughput=w.throughput if w else 0.0, joined_from=self.joined_from,
                           lost=self.driver.lost_groups() if self.driver is not None and self.stage == 0 else (),
                           generations=tuple(known.get(i, 0) for i in range(self.config.model.num_stages + 1)))

    def record_key(self) -> int | None:
        return None if self.state is StageState.STANDBY else self.stage

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
        await self.watch.on_view(self.view)
        if self.driver is not None and self.stage == 0:
            self.driver.on_view(self.view)
            self.lead.on_view()

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

    # -- own record --------------------------------------------------------------------------------------

    async def announce(self) -> None:
        await self.announcer.announce()

    async def store_own(self, stage: int | None, *, ttl_s: float | None = None) -> bool:
        return await self.announcer.store(stage, ttl_s=ttl_s)

    def heartbeat_soon(self) -> None:
        self.announcer.soon()

    # -- serving -----------------------------------------------------------------------------------------

    async def accept_commit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        return await self.commits.accept(meta, peer_id)

    def check_step(self, worker: StageWorker, key: AttemptKey) -> None:
        self.commits.check_step(worker, key)

    async def prepare_in_group(self, key: AttemptKey, group: list[str], samples: int,
                               rounds: int) -> tuple[float, float, str]:
        return await self.commits.prepare_in_group(key, group, samples, rounds)

    def last_attempt_seen(self) -> int:
        return self.commits.last_attempt

    def note_commit_norms(self, norms: dict[int, tuple[int, float, float]]) -> None:
        if self.driver is not None:
            self.driver.note_commit_norms(norms)

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
        await self.lead.accept_abort(meta)

    async def confirm_suspect(self, peer: str) -> bool:
        return await self.lead.confirm_suspect(peer)

    async def weights_snapshot(self, replica: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This stage's weights, or (`replica`) the stage-0 replica it holds, with the metadata a rebuild checks."""
        worker = self.worker
        assert worker is not None
        if replica:
            return copies.replica_snapshot(self)
        state = await self.compute(worker.snapshot)
        meta = {"stage": self.stage, "step": worker.step, "generation": self.generation,
                "grad_norm": worker.grad_norm, "grad_norm_raw": worker.grad_norm_raw,
                "config_hash": self.config.model.config_hash()}
        return meta, state

    async def member_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Stage groups: our weights, Adam state and step, for a newcomer of our group to copy exactly."""
        worker = self.worker
        assert worker is not None
        meta, state = await self.compute(worker.export_state)
        return {**meta, "stage": self.stage, "generation": self.generation,
                "config_hash": self.config.model.config_hash()}, state

    def group_averager(self, size: int | None = None) -> GroupAverager:
        """The all-reduce of our stage's group (created on first use; a new stage gets a new one) over vectors
        of `size` values (default: our worker's parameters)."""
        if self._averager is not None and self._averager[0] == self.stage:
            return self._averager[1]
        self.close_averager()
        if size is None and self.worker is not None:
            size = self.worker.num_parameters
        if self._averagers is None or size is None or self.stage is None:
            raise AveragingError("this node cannot average: no all-reduce (hivemind DHT) or no stage")
        averager = self._averagers(prefix=averaging_prefix(self.run_id, self.stage), size=size,
                                   timeout_s=self.config.group.averaging_timeout_s,
                                   matchmaking_s=self.config.group.matchmaking_s, own_peer=self.peer_id)
        self._averager = (self.stage, averager)
        return averager

    def close_averager(self) -> None:
        if self._averager is not None:
            self._averager[1].close()
            self._averager = None

    async def accept_admit(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        if self.stage != 0 or self.driver is None or self.state is not StageState.ONLINE:
            raise InvalidPayload("admission", "only stage 0's driver admits members")
        return await self.driver.admit(peer_id, meta["stage"], meta["generation"])

    async def accept_replica(self, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        await copies.accept_replica(self, meta, state)

    async def accept_restore(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        return await copies.accept_restore(self, meta)

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
            self.spawn(self.announcer.run(), "heartbeat")
            self.spawn(self._membership_loop(), "membership")
            while True:
                self.driver = None
                self.joined_from = ""
                self.close_averager()
                got = await claim.claim_stage(self)
                stage = got.stage
                try:
                    if got.join:  # a live group: an exact copy of one of its members, no CheckFree
                        worker = await join.join_group(self, stage)
                    else:
                        worker = await rebuild.acquire_stage(self, stage)
                    if stage == 0:  # the lead drives; a follower of stage 0's group is ready to take over
                        self.driver = Driver(self)
                        await self.driver.prepare()
                    if not got.join:
                        await claim.confirm_claim(self, stage,  # the unique claimant
                                                  fresh_build=worker.step == self.config.train.start_step)
                except Exception as e:  # noqa: BLE001 - RecoveryError, a rival claim, a DHT failure: retry
                    if not isinstance(e, (RecoveryError, UnrecoverableError)):
                        self.metrics.loop_errors.labels(loop="claim").inc()
                    logger.warning("giving stage %d back: %s: %s", stage, type(e).__name__, e)
                    await claim.retreat(self, stage)
                    self.driver = None
                    self.joined_from = ""
                    self.set_state(StageState.JOINING, stage=None)
                    await asyncio.sleep(self.config.heartbeat.period_s)
                    continue
                self.worker = worker
                self.metrics.model_parameters.set(worker.num_parameters)
                self._seen_hops.clear()  # hop ids are only unique per stage
                self.watch.reset()
                self.stage_lost.clear()
                self.lead.reset()
                self.set_state(StageState.ONLINE, stage=stage)
                try:
                    await self.announce()
                except Exception as e:  # noqa: BLE001 - the heartbeat loop announces again soon
                    logger.warning("announcing ONLINE failed (%s); the heartbeat retries", e)
                self.events.emit("online", stage=stage, generation=self.generation, step=worker.step)
                self._ready(endpoint.maddrs())
                if await self._serve_until_fenced():
                    await self._export("max_steps")
                    return
                await claim.retreat(self, stage)  # stepped down: the stage reads as ours no more
        except asyncio.CancelledError:
            if self.config.export_on_exit:
                await self._export("stopped")
            raise
        finally:
            await self.leave(endpoint)

    async def _export(self, why: str) -> None:
        """`--export-dir` on stage 0: write the whole model (cfnode/export.py) while this node is still the ring's
        stage 0, so the other stages serve it their weights. A failed export is logged, never raised."""
        worker = self.worker
        if self.config.export_dir is None or self.stage != 0 or worker is None or self.client is None:
            return
        from cfnode.export import export_from_ring

        try:
            state = await self.compute(worker.snapshot)
            info = await export_from_ring(self.config.export_dir, config=self.config, stage0_state=state,
                                          step=worker.step, generation=self.generation, client=self.client,
                                          view=await self.refresh_view(), peer_id=self.peer_id)
        except (CfnodeError, OSError) as e:
            logger.error("exporting the model to %s failed: %s", self.config.export_dir, e)
            self.events.emit("export_failed", why=why, error=str(e)[:300])
            return
        logger.info("exported step %d to %s", info["step"], self.config.export_dir)
        self.events.emit("exported", dir=self.config.export_dir, step=info["step"], why=why)

    async def _check_meta(self) -> None:
        """The run's settings check, retried while the DHT fails (a mismatch is final: exit 2)."""
        while True:
            try:
                await claim.check_meta(self)
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
            waiters.append(asyncio.ensure_future(self.lead.drive_once_leading()))
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.driving = False
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
        self.close_averager()
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
