"""How a node moves microbatches: the route checks of incoming hops, running them on the compute thread, and
pushing results to the next stage of the route with a ping-confirmed retry, de-duplication and failure reports
to stage 0. A mixin of `Node` (process.py), which owns the state it uses.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from cfnode.errors import InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.train.schedule import AttemptKey, route_for, route_neighbours
from cfnode.train.worker import worker_holds

if TYPE_CHECKING:
    from cfnode.config import NodeConfig
    from cfnode.logs import EventLog
    from cfnode.metrics import NodeMetrics
    from cfnode.net.client import StageClient
    from cfnode.train.worker import StageWorker

logger = logging.getLogger(__name__)
MAX_INCARNATION = 1024
"""Bound on a hop's `inc` (how often stage 0 sent a microbatch again around a lost member within one attempt)."""
SEEN_HOPS_LIMIT = 4096
"""Hops remembered for de-duplication: a push retried after a lost ack must not be processed twice."""


class HopHandling:
    """The hop-handling half of a Node."""

    config: NodeConfig
    stage: int | None
    worker: StageWorker | None
    metrics: NodeMetrics
    events: EventLog
    client: StageClient | None
    driver: Any
    driving: bool
    run_id: str
    peer_id: str
    routes: Any
    generation: int
    _seen_hops: OrderedDict[tuple[Any, ...], None]

    def check_route(self, meta: dict[str, Any]) -> None:
        """A hop's route must be the one this run prescribes for its microbatch (in order for validation)."""
        swaps = self.config.swaps and meta["kind"] == "train"
        expected = route_for(meta["mb"], self.config.model.num_stages, swaps=swaps)
        if tuple(meta["route"]) != expected:
            raise InvalidPayload("route", f"{meta['kind']} microbatch {meta['mb']} must take route {list(expected)}, "
                                          f"got {meta['route']!r:.80}")

    def check_path(self, method: str, meta: dict[str, Any], peer_id: str) -> None:
        """Stage groups: a hop names the member of each stage on its route (`path`, pinned by stage 0's balancer)
        and the member of stage 0's group it starts and ends at (`origin`, default its `driver`); we must be our
        stage's and the sender its stage's."""
        path = meta.get("path")
        if path is None:
            return
        route = meta["route"]
        self.check_path_fields(meta)
        assert self.stage is not None
        if self.stage != 0 and path[route.index(self.stage)] != self.peer_id:
            raise InvalidPayload("route", f"the path gives stage {self.stage} to {path[route.index(self.stage)][:12]}")
        sender = self.expected_sender(method, meta)
        if sender != 0 and path[route.index(sender)] != peer_id:
            raise InvalidPayload("unauthorized", f"the path gives stage {sender} to another member")
        driver, origin = meta.get("driver"), meta.get("origin")
        if self.stage == 0 and origin is not None and origin != self.peer_id:
            raise InvalidPayload("route", f"the hop's origin is stage 0's member {origin[:12]}")
        ends = origin if origin is not None else driver  # the stage-0 member the microbatch starts and ends at
        if sender == 0 and ends is not None and ends != peer_id:
            raise InvalidPayload("unauthorized", "the hop names another member of stage 0 as its origin")

    def check_path_fields(self, meta: dict[str, Any]) -> None:
        """The shape of a hop's `path`, `inc`, `driver` and `origin` (who they name is checked by the caller)."""
        path, route = meta.get("path"), meta["route"]
        if not isinstance(path, list) or len(path) != len(route) or not all(isinstance(p, str) for p in path):
            raise InvalidPayload("route", f"path must name one peer per stage of route {route!r:.60}")
        inc = meta.get("inc", 0)
        if type(inc) is not int or not 0 <= inc <= MAX_INCARNATION:
            raise InvalidPayload("route", f"inc must be an integer 0..{MAX_INCARNATION}")
        for name in ("driver", "origin"):
            value = meta.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > 128):
                raise InvalidPayload("route", f"{name} must name a member of stage 0's group")

    def hop_peer(self, meta: dict[str, Any], target: int) -> str:
        """The member of stage `target` a hop goes to: the one its path names; for stage 0 its origin (a follower
        of stage 0's group that was assigned the microbatch), else the driver the hop names, while it is a member
        of stage 0's group (after a takeover our view may still list the dead lead first), else stage 0's lead."""
        peer = self.path_peer(meta, target)
        if peer is None:
            return self.stage0_peer(meta) if target == 0 else self.route(target)
        if self.routes.is_banned(peer):
            raise PeerUnavailableError(f"stage {target}'s member {peer[:12]} is banned")
        return peer

    def path_peer(self, meta: dict[str, Any], target: int) -> str | None:
        """The member of stage `target` the hop names: its path's for a transformer stage, its origin for stage 0
        when that is not the driver (None without them)."""
        if target == 0:
            origin = meta.get("origin")
            return origin if origin is not None and origin != meta.get("driver") else None
        path = meta.get("path")
        return path[meta["route"].index(target)] if path is not None else None

    def stage0_peer(self, meta: dict[str, Any]) -> str:
        """Stage 0's driver: where results without an origin and failure reports go."""
        driver = meta.get("driver")
        if (isinstance(driver, str) and not self.routes.is_banned(driver)
                and any(p.peer_id == driver for p in self.view.group(0))):
            return driver
        return self.route(0)

    def expected_sender(self, method: str, meta: dict[str, Any]) -> int:
        """The stage a hop must come from: the forward predecessor on its route, or for gradients the forward
        successor (the backward pass runs the route reversed)."""
        assert self.stage is not None
        before, after = route_neighbours(meta["route"], self.stage)
        return before if method == "forward" else after

    def route_target(self, method: str, meta: dict[str, Any]) -> int:
        """Where this stage sends a hop's result next."""
        assert self.stage is not None
        before, after = route_neighbours(meta["route"], self.stage)
        return after if method == "forward" else before


    # -- hop handling (the servicer calls these) ---------------------------------------------------------

    async def accept_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        key = AttemptKey(meta["step"], meta["attempt"])
        num_mb = self.config.train.num_microbatches  # our own bound, never the sender's
        if meta["kind"] == "train" and (meta["num_mb"] != num_mb or not 0 <= meta["mb"] < num_mb):
            raise InvalidPayload("decode", f"microbatch {meta['mb']} of {meta['num_mb']} (this run has {num_mb})")
        hop_id = (meta["kind"], key.step, key.attempt, method, meta["mb"], meta.get("inc", 0))
        if hop_id in self._seen_hops:
            logger.debug("duplicate %s of %s mb %d (a retried push); acknowledged again", method, key, meta["mb"])
            return
        if self.stage == 0:
            assert self.driver is not None
            handler = self.driver.runs if meta["kind"] == "train" else self.driver
            if not handler.accept(method, meta, key):  # raises InvalidPayload("stale_step") for a foreign attempt
                logger.debug("%s of %s mb %d is a superseded incarnation; dropped", method, key, meta["mb"])
                return
        elif meta["kind"] == "train":
            w = self.worker
            assert w is not None
            self.check_step(w, key)  # the step must be the one this stage is at (node.py)
            if w.active is not None and tuple(key) < tuple(w.active):
                raise InvalidPayload("stale_step", f"attempt {tuple(key)} is older than {tuple(w.active)}",
                                     holds=worker_holds(w))
        if meta["kind"] == "train":
            self._debug_kill_mid_step(key)
        self._seen_hops[hop_id] = None
        while len(self._seen_hops) > SEEN_HOPS_LIMIT:
            self._seen_hops.popitem(last=False)
        self.metrics.microbatches_processed.labels(direction=method).inc()
        if meta["kind"] == "train":
            self.metrics.hops_received.labels(direction=method, from_stage=str(meta["from_stage"])).inc()
        self.spawn(self._process_hop(method, meta, tensor), name=f"hop-{method}")

    def _debug_kill_mid_step(self, key: AttemptKey) -> None:
        """--debug-kill-mid-step (a test seam): a real SIGKILL of this process while it holds a microbatch (any
        member but stage 0's lead)."""
        at, worker = self.config.train.debug_kill_mid_step, self.worker
        if at is not None and not self.driving and worker is not None and key.step >= worker.base_step + at \
                and worker.active == key and worker.stash:
            logger.warning("--debug-kill-mid-step %d: SIGKILL at step %d with a microbatch in hand (built or joined "
                           "at step %d)", at, key.step, worker.base_step)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _process_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        if self.stage == 0:
            await (self.driver.runs if meta["kind"] == "train" else self.driver).process(method, meta, tensor)
            return
        worker = self.worker
        assert worker is not None and self.stage is not None
        key, mb = AttemptKey(meta["step"], meta["attempt"]), meta["mb"]
        try:
            if meta["kind"] == "val":
                out = await self.compute(worker.eval_forward, tensor)
            elif method == "forward":
                out = await self.compute(self._forward_train, key, mb, meta.get("inc", 0), tensor)
            else:
                out = await self.compute(self._backward_train, key, mb, meta.get("inc", 0), tensor)
        except KeyError:
            self.metrics.microbatches_dropped.labels(reason="error").inc()
            logger.debug("dropped %s of %s mb %d: its attempt was superseded", method, tuple(key), mb)
            return
        await self.send_hop(method, meta, out, self.route_target(method, meta))

    def _forward_train(self, key: AttemptKey, mb: int, inc: int, x: torch.Tensor) -> torch.Tensor:
        worker = self.worker
        assert worker is not None
        dropped = worker.begin(key)
        if dropped:
            self.metrics.microbatches_dropped.labels(reason="reported").inc(dropped)
        if worker.active != key:
            raise KeyError(key)
        y = worker.forward(key, mb, x, inc)
        worker.shadow_forward(y)  # `redundant` only: the successor's forward, computed again here
        return y

    def _backward_train(self, key: AttemptKey, mb: int, inc: int, g: torch.Tensor) -> torch.Tensor:
        worker = self.worker
        assert worker is not None
        if worker.active != key:
            raise KeyError(key)
        return worker.backward(key, mb, g, inc)

    async def send_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor, target: int) -> bool:
        """Push to the owner of `target`; on failure ban it and tell stage 0 to abort. Returns success."""
        assert self.stage is not None
        out_meta = {**meta, "from_stage": self.stage, "to_stage": target, "generation": self.generation}
        try:
            peer = self.hop_peer(meta, target)
        except PeerUnavailableError:
            await self.refresh_view()  # a new holder may have come online since the last poll
            try:
                peer = self.hop_peer(meta, target)
            except PeerUnavailableError as e:
                await self.report_failure(meta, f"stage {target} unavailable: {e}", suspect=target,
                                          suspect_peer=self.path_peer(meta, target))
                return False
        assert self.client is not None
        try:
            try:
                await self.client.push(method, peer, out_meta, tensor)
            except PeerUnavailableError as first:
                if not await self.is_reachable(peer):
                    raise
                logger.info("%s to stage %d failed (%s) but the peer answers a ping; retrying once",
                            method, target, first)
                self.metrics.rpc_retries.labels(method=method).inc()
                await self.client.push(method, peer, out_meta, tensor)  # receivers de-duplicate hops
            return True
        except (PeerUnavailableError, RejectedError) as e:
            logger.warning("%s to stage %d (%s) failed: %s", method, target, peer[:12], e)
            if isinstance(e, PeerUnavailableError):
                self.ban(peer, "rpc_failure")  # counted as a failure once its record expires (membership.watch)
                self.events.emit("neighbour_unreachable", stage=target, peer=peer[:12], error=str(e)[:200])
            await self.report_failure(meta, f"{method} to stage {target} failed: {e}",
                                      suspect=target if isinstance(e, PeerUnavailableError) else None,
                                      suspect_peer=peer if isinstance(e, PeerUnavailableError) else None,
                                      holds=getattr(e, "holds", None))
            return False

    async def is_reachable(self, peer_id: str) -> bool:
        """Confirm a suspected failure with a short rpc_info ping."""
        assert self.client is not None
        try:
            await self.client.info(peer_id)
            return True
        except PeerUnavailableError:
            return False

    async def report_failure(self, meta: dict[str, Any], reason: str, *, suspect: int | None = None,
                             suspect_peer: str | None = None, holds: tuple[int, int] | None = None) -> None:
        """Fast path: tell stage 0 that this attempt cannot complete (it would time out otherwise), and which
        stage (and member) we could not reach, so stage 0 can confirm and stop routing to it."""
        if meta.get("kind") != "train":
            return
        if self.stage == 0 and self.driving:
            self.driver.adopt(holds)
            self.driver.fail_attempt(AttemptKey(meta["step"], meta["attempt"]), "peer_unavailable", reason,
                                     suspect=suspect_peer)
            return
        try:
            peer0 = self.stage0_peer(meta)
            await self.client.abort(peer0, {"run": self.run_id, "step": meta["step"], "attempt": meta["attempt"],
                                            "reason": reason[:300], "from_stage": self.stage,
                                            "generation": self.generation,
                                            "suspect_stage": -1 if suspect is None else suspect,
                                            "suspect_peer": suspect_peer or "",
                                            "holds": list(holds) if holds is not None else None})
        except (PeerUnavailableError, RejectedError) as e:
            logger.debug("could not report the failure to stage 0: %s", e)

    # -- stage 0's group: microbatches assigned to a follower (train/origin.py) ------------------------------

    async def accept_assign(self, meta: dict[str, Any], peer_id: str) -> None:
        """rpc_assign: our lead hands us a training microbatch; we start it (the step must be ours and the
        attempt not older than the one we hold). A retried assign (a lost reply) starts nothing twice."""
        worker, driver = self.worker, self.driver
        if self.stage != 0 or driver is None or worker is None or self.driving:
            raise InvalidPayload("wrong_stage", "only a follower of stage 0's group is assigned microbatches")
        num_mb = self.config.train.num_microbatches
        if meta["kind"] != "train" or meta["num_mb"] != num_mb or not 0 <= meta["mb"] < num_mb:
            raise InvalidPayload("decode", f"{meta['kind']!r:.20} microbatch {meta['mb']} of {meta['num_mb']} "
                                           f"(a training one of this run's {num_mb})")
        self.check_route(meta)
        if meta["from_stage"] != 0 or meta["to_stage"] != meta["route"][0]:
            raise InvalidPayload("route", "an assigned microbatch goes from stage 0 to its route's first stage")
        if meta.get("path") is None:
            raise InvalidPayload("route", "an assigned microbatch carries its path")
        self.check_path_fields(meta)
        if meta.get("driver") != peer_id or meta.get("origin") != self.peer_id:
            raise InvalidPayload("unauthorized", "an assigned microbatch names its sender as driver and us as origin")
        key = AttemptKey(meta["step"], meta["attempt"])
        self.check_step(worker, key)
        hop_id = ("assign", key.step, key.attempt, meta["mb"], meta.get("inc", 0))
        if hop_id in self._seen_hops:
            return
        await self.compute(worker.begin, key)
        if worker.active != key:
            raise InvalidPayload("stale_step", f"attempt {tuple(key)} is older than {worker.active}",
                                 holds=worker_holds(worker))
        if not driver.runs.take(key, meta):
            return  # a superseded incarnation
        self._seen_hops[hop_id] = None
        self.spawn(driver.runs.start(meta), name="assigned")

    async def accept_done(self, meta: dict[str, Any], peer_id: str) -> None:
        """rpc_done: a follower of our group finished a microbatch we assigned it."""
        if self.stage != 0 or self.driver is None or not self.driving:
            raise InvalidPayload("wrong_stage", "only stage 0's lead takes microbatch reports")
        self.driver.done(AttemptKey(meta["step"], meta["attempt"]), meta["mb"], meta["inc"], float(meta["loss"]),
                         origin=peer_id)

    async def microbatch_done(self, meta: dict[str, Any], loss: float) -> None:
        """Our stage-0 part of a microbatch is done: tell the driver (ourselves, or our group's lead)."""
        key = AttemptKey(meta["step"], meta["attempt"])
        if self.driving:
            try:
                self.driver.done(key, meta["mb"], meta.get("inc", 0), loss, origin=self.peer_id)
            except InvalidPayload as e:
                logger.debug("microbatch %d of %s is done but no longer awaited: %s", meta["mb"], tuple(key), e)
            return
        assert self.client is not None
        report = {"run": self.run_id, "step": key.step, "attempt": key.attempt, "mb": meta["mb"],
                  "inc": meta.get("inc", 0), "loss": loss, "generation": self.generation}
        try:
            await self.client.done(self.stage0_peer(meta), report)
        except (PeerUnavailableError, RejectedError) as e:
            logger.info("could not report microbatch %d of %s done to stage 0's lead: %s", meta["mb"], tuple(key), e)

