"""Stage 0's step driver (ARCHITECTURE §6): the microbatches of step s are a pure function of (seed, s); it keeps
several in the ring, pins each microbatch's path over the stage groups' members (train/paths.py,
train/balancer.py), stage 0's group included: the member of stage 0 a microbatch starts and ends at, its origin,
embeds it, computes head + loss when activations come back from stage L and runs the embedding backward when
gradients come back from stage 1 (train/origin.py; the lead's own microbatches run here, a follower's are handed
to it with rpc_assign and reported with rpc_done). Then it has every member of every stage commit (train/commit.py: a group averages its gradients, then
clip, norms, Adam step). At a step boundary it lets newcomers into stage groups (train/admission.py).

A member of a stage group (a follower of stage 0's too) lost while its microbatches are in flight (a failed hop
pointing at it and a failed ping, or its record gone) costs no abort: it leaves the attempt, and every microbatch whose path went through it
is sent again (one incarnation more, `inc`) through another member of its group; the stages that already
accumulated that microbatch only pass its gradient on (train/worker.py). Any other failed hop, an abort report, a
missing stage, a member lost during the commit or the step timeout aborts the attempt: every partial result is
dropped (the other stages drop theirs when they see a newer attempt) and the same step is retried with the same
data: at once, around a group member found dead; otherwise once the ring is whole. Accounting: issued ==
committed + dropped microbatches; the ones sent again are counted as rerouted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cfnode.deadline import within
from cfnode.errors import AttemptAborted, InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.net.records import SwarmView
from cfnode.recovery import copies
from cfnode.recovery.rollback import CheckpointRollback
from cfnode.train.admission import Admissions
from cfnode.train.commit import GroupDiverged, Prepared, StepCommit
from cfnode.train.origin import OriginRuns
from cfnode.train.paths import AttemptPaths
from cfnode.train.reroute import Reroutes
from cfnode.train.ring import RingWait
from cfnode.train.schedule import AttemptKey, launch_order, route_for, tokens_per_step
from cfnode.train.suspects import Suspects

if TYPE_CHECKING:
    from cfnode.clock import Clock
    from cfnode.node.routes import RouteTable

logger = logging.getLogger(__name__)
ATTEMPT_COUNTER_BITS = 32
TAKEOVER_SKIP = 2**20
"""Attempts a new lead of stage 0's group skips past the last one it saw (its lead cannot have started more)."""


def batch_fingerprint(batch: torch.Tensor) -> str:
    """A short digest of a step's token ids (logged with each step: proves the data order after a resume)."""
    return hashlib.sha256(batch.contiguous().numpy().tobytes()).hexdigest()[:16]


class DriverHost(copies.CopyHost, Protocol):
    """What the driver needs from stage 0's node besides what copies need: the view, hops and the clock."""

    clock: Clock
    peer_id: str
    join_addr: str | None
    routes: RouteTable

    @property
    def view(self) -> SwarmView: ...
    async def refresh_view(self) -> SwarmView: ...
    async def send_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor, target: int) -> bool: ...
    def route_target(self, method: str, meta: dict[str, Any]) -> int: ...
    def after_commit(self, norm: float, raw: float) -> None: ...
    async def microbatch_done(self, meta: dict[str, Any], loss: float) -> None: ...
    async def confirm_suspect(self, peer: str) -> bool: ...
    def heartbeat_soon(self) -> None: ...
    async def prepare_in_group(self, key: AttemptKey, group: list[str], samples: int,
                               rounds: int) -> tuple[float, float, str]: ...


class Driver:
    def __init__(self, host: DriverHost) -> None:
        self.host = host
        self.cfg = host.config
        self.attempt: AttemptKey | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._val_pending: dict[int, asyncio.Future[float]] = {}
        self._val_key: AttemptKey | None = None
        self._losses: dict[int, float] = {}
        self._failure: tuple[str, str] | None = None
        self._last_attempt_id = 0
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None
        self.runs = OriginRuns(host)
        self.stats = {"issued": 0, "committed": 0, "dropped": 0}
        self.history: list[dict[str, Any]] = []
        self.paths = AttemptPaths()
        self.admissions = Admissions(host)  # type: ignore[arg-type]
        self.commit = StepCommit(host, self.paths, self.adopt)
        self.suspects = Suspects(host, self.paths, self.commit)
        self.reroutes = Reroutes(self)
        self.rollback = CheckpointRollback(host)
        self.ring = RingWait(host)

    async def prepare(self) -> None:
        """Load the corpus and tokenize it (cached on disk) on the compute thread."""
        from cfnode.model.data import load_run_tokens

        started = time.perf_counter()
        self.train_tokens, self.val_tokens = await self.host.compute(load_run_tokens, self.cfg)
        self.runs.tokens = self.train_tokens
        logger.info("data ready: %d train / %d validation tokens (%.1fs)", self.train_tokens.numel(),
                    self.val_tokens.numel(), time.perf_counter() - started)

    def _new_attempt_id(self) -> int:
        """Attempt ids are (generation, counter): a replacement stage 0 has a higher generation, so its attempts
        outrank the old one's whatever the clocks say; `adopt` lifts the counter past what a stage holds."""
        self._last_attempt_id = max(self._last_attempt_id + 1, self.host.generation << ATTEMPT_COUNTER_BITS)
        return self._last_attempt_id

    def adopt(self, holds: tuple[int, int] | None) -> None:
        """A stage refused an attempt as stale and said which one it holds: the next attempt outranks it."""
        if holds is not None and holds[1] > self._last_attempt_id:
            logger.info("a stage holds attempt %d, newer than ours (%d); the next attempt outranks it", holds[1],
                        self._last_attempt_id)
            self._last_attempt_id = holds[1]

    def take_over(self, last_seen: int) -> None:
        """A follower of stage 0's group takes over from its lead; `last_seen` is the newest attempt its lead's
        commits named. The dead lead may have started more attempts since, so ours skip TAKEOVER_SKIP ahead and
        the stages take the first of them (rather than refuse it as stale and tell us which one they hold)."""
        floor = max(self._last_attempt_id, last_seen, self.host.generation << ATTEMPT_COUNTER_BITS)
        self._last_attempt_id = floor + TAKEOVER_SKIP

    # -- incoming ----------------------------------------------------------------------------------------

    def accept(self, method: str, meta: dict[str, Any], key: AttemptKey) -> bool:
        """Synchronous check in the RPC handler: is this validation hop part of what we are waiting for? (Training
        hops go to `runs`.)"""
        if self._val_key is None or key != self._val_key:
            raise InvalidPayload("stale_step", f"attempt {tuple(key)} is not in progress")
        if meta["mb"] not in self._val_pending or self._val_pending[meta["mb"]].done():
            raise InvalidPayload("stale_step", f"microbatch {meta['mb']} is not in flight")
        return True

    async def process(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        """A validation microbatch back from stage L: its loss."""
        host, worker = self.host, self.host.worker
        assert worker is not None and self._val_targets is not None
        key, mb = AttemptKey(meta["step"], meta["attempt"]), meta["mb"]
        loss = await host.compute(worker.eval_loss, tensor, self._val_targets[mb])
        fut = self._val_pending.get(mb)
        if fut is not None and not fut.done() and key == self._val_key:
            fut.set_result(loss)

    def done(self, key: AttemptKey, mb: int, inc: int, loss: float, *, origin: str) -> None:
        """Stage 0's member `origin` finished incarnation `inc` of microbatch `mb` (its embedding backward ran),
        with this loss. InvalidPayload if that is not what we wait for; an incarnation sent again since is
        ignored."""
        if key != self.attempt:
            raise InvalidPayload("stale_step", f"attempt {tuple(key)} is not in progress")
        if not 0 <= mb < self.cfg.train.num_microbatches or self.paths.origin("train", mb) is None:
            raise InvalidPayload("stale_step", f"microbatch {mb} is not in flight")
        if self.paths.origin("train", mb) != origin:
            raise InvalidPayload("unauthorized", f"microbatch {mb} was not given to {origin[:12]}")
        if inc != self.reroutes.of(mb):
            return
        self._losses[mb] = loss
        self.paths.done("train", mb)
        fut = self._pending.get(mb)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _start(self, key: AttemptKey, meta: dict[str, Any]) -> bool:
        """Start a training microbatch at its origin: here, or handed to a follower of stage 0's group. False if
        that failed (the attempt is failed, or goes on around a follower found dead)."""
        origin = meta["origin"]
        if origin == self.host.peer_id:
            return self.runs.take(key, meta) and await self.runs.start(meta)
        assert self.host.client is not None
        try:
            await self.host.client.assign(origin, meta)
            return True
        except (PeerUnavailableError, RejectedError) as e:
            self.adopt(getattr(e, "holds", None))
            self.fail_attempt(key, "peer_unavailable", f"assigning microbatch {meta['mb']} to stage 0's member "
                              f"{origin[:12]} failed: {e}",
                              suspect=origin if isinstance(e, PeerUnavailableError) else None)
            return False

    def fail_attempt(self, key: AttemptKey, reason: str, detail: str, *, suspect: str | None = None) -> None:
        """A hop or report says the attempt cannot complete. When it points at a member of a stage group that has
        another one, that member is pinged first: if it is dead the attempt goes on around it (train/reroute.py)."""
        if key != self.attempt:
            return
        if (self._failure is None and suspect is not None and self._pending
                and self.reroutes.handle(key, suspect, reason, detail)):
            return
        if suspect is not None:  # also once the attempt failed: every member a hop pointed at is pinged
            self.suspects.add(suspect)
        if self._failure is None:
            self.fail(reason, detail)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def fail(self, reason: str, detail: str) -> None:
        self._failure = (reason, detail)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(AttemptAborted(f"{reason}: {detail}"))

    def reopen(self, mb: int) -> None:
        """A microbatch is sent again: wait for it once more."""
        if self._pending[mb].done():
            self._pending[mb] = asyncio.get_running_loop().create_future()

    async def resend(self, key: AttemptKey, mb: int, inc: int) -> None:
        """Send a rerouted microbatch from the start again (its origin embeds it again)."""
        if key != self.attempt or inc != self.reroutes.of(mb):
            return
        await self._start(key, self._train_meta(key, mb))

    def on_view(self, view: SwarmView) -> None:
        """Membership changed: an attempt cannot finish while a stage has no live owner; a member of this
        attempt's groups gone from the view is treated like a failed hop to it."""
        if self.attempt is None:
            return
        for idx in range(1, self.cfg.model.num_stages + 1):
            if view.online_owner(idx) is None:
                self.fail_attempt(self.attempt, "stage_missing", f"stage {idx} has no live owner")
                return
        for idx in range(self.cfg.model.num_stages + 1):
            live = {p.peer_id for p in view.group(idx)}
            for peer in self.paths.group(idx):
                if peer not in live and peer != self.host.peer_id:
                    self.fail_attempt(self.attempt, "member_gone", f"stage {idx}'s member {peer[:12]} left the "
                                      "view", suspect=peer)

    # -- the loop ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        worker = self.host.worker
        assert worker is not None
        self.host.events.emit("training_started", step=worker.step)
        try:
            await self._train()
        finally:  # stopped (fenced, shutting down): a replica push still in flight is dropped
            self.commit.replicas.drop()
        self.host.events.emit("training_finished", step=worker.step, **self.stats)

    async def _train(self) -> None:
        train = self.cfg.train
        worker = self.host.worker
        assert worker is not None
        while train.max_steps is None or worker.step < train.max_steps:
            if train.debug_hold_at_step is not None and worker.step >= train.debug_hold_at_step:
                await self.commit.replicas.catch_up()  # every holder keeps this very step
                logger.warning("holding before step %d (--debug-hold-at-step); still serving RPCs", worker.step)
                self.host.events.emit("held", step=worker.step)
                await asyncio.Event().wait()
            await self.ring.complete()
            if self.cfg.recovery.mode == "checkpoint" and not await self.rollback.if_needed(self._last_attempt_id):
                continue
            await self.admissions.serve(worker.step)
            step = worker.step
            started = time.perf_counter()
            try:
                result = await self.run_attempt(step)
            except AttemptAborted as e:
                rerouted = await self.suspects.confirm()
                await self.host.refresh_view()
                if not rerouted:  # a member of a group died: its siblings take the retry at once
                    await asyncio.sleep(train.retry_backoff_s)
                logger.warning("step %d aborted (%s); retrying with the same data", step, e)
                continue
            except Exception as e:  # the driver must outlive any single failure
                self.host.metrics.loop_errors.labels(loop="driver").inc()
                logger.exception("step %d failed unexpectedly (%s); retrying", step, e)
                await asyncio.sleep(train.retry_backoff_s)
                await self.host.refresh_view()
                continue
            if self.suspects.pending():  # a member lost while applying: ping it now
                await self.suspects.confirm()
            if result is None:  # the swarm skipped the step (a non-finite gradient): no loss to report
                continue
            loss, batch_sha = result
            elapsed = time.perf_counter() - started
            tokens = tokens_per_step(train.num_microbatches, train.microbatch_size, self.cfg.model.seq_len)
            m = self.host.metrics
            m.loss.set(loss)
            m.step_duration.observe(elapsed)
            m.tokens_processed.inc(tokens)
            record: dict[str, Any] = {"step": worker.step, "loss": loss, "step_s": elapsed,
                                      "tokens_per_s": tokens / elapsed, "grad_norm": worker.grad_norm,
                                      "batch_sha": batch_sha, "time": self.host.clock.time()}
            if train.val_every and (worker.step % train.val_every == 0 or worker.step == 1
                                    or worker.step == train.max_steps):
                record["val_loss"] = await self.validate()
            self.history.append(record)
            self.host.events.emit("step", **record)
        await self.commit.replicas.catch_up()  # the last step on every holder, before the run ends

    async def run_attempt(self, step: int) -> tuple[float, str] | None:
        """One try at step `step`; returns the mean loss and a fingerprint of the step's batch (so a run's data
        order can be audited), None if the swarm skipped the step (a non-finite gradient), or raises
        AttemptAborted (state already dropped). Once every stage prepared, the step is decided: it is applied
        everywhere (retried until each stage confirmed) and can no longer abort."""
        train, host = self.cfg.train, self.host
        worker = host.worker
        assert worker is not None
        key = AttemptKey(step, self._new_attempt_id())
        batch = self.runs.batch(step)
        loop = asyncio.get_running_loop()
        await host.compute(worker.begin, key)
        self.runs.open(key)
        members = {i: host.routes.members(i) for i in range(1, self.cfg.model.num_stages + 1)}
        if not all(members.values()):
            raise AttemptAborted("a stage has no live member")
        self.paths.start({0: self.stage0_group(), **members})
        self.attempt, self._failure, self._losses = key, None, {}
        self.reroutes.start()
        self._pending = {mb: loop.create_future() for mb in range(train.num_microbatches)}
        self.stats["issued"] += train.num_microbatches
        host.metrics.microbatches_issued.inc(train.num_microbatches)
        try:
            await within(self._drive(key), train.step_timeout_s)
            self.reroutes.committing = True
            prepared = await self.commit.prepare_all(key)
        except asyncio.CancelledError:  # the driver stops (fenced, shutting down): the attempt is dropped
            self._account_dropped(key, "cancelled", "the driver stopped during the attempt")
            raise
        except Exception as e:  # every failure before the decision aborts the attempt, and is accounted for
            if self._failure:
                reason = self._failure[0]
            elif isinstance(e, GroupDiverged):
                reason = "group_diverged"
            elif isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                reason = "timeout"
            elif isinstance(e, RejectedError):
                reason = "rejected"
            elif isinstance(e, (PeerUnavailableError, AttemptAborted)):
                reason = "peer_unavailable"
            else:
                reason = "error"
            self._abort(key, reason, str(e) or type(e).__name__)
            raise AttemptAborted(f"{reason}: {e}") from e
        finally:
            self.attempt = None
            self.runs.close()
            self.reroutes.stop()
            for fut in self._pending.values():
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # mark retrieved
        try:
            await self.commit.apply_all(key, prepared)
        except asyncio.CancelledError:  # decided: stage 0 applied first, so the step counts as committed
            self._account_decided(prepared)
            raise
        self._account_decided(prepared)
        if prepared.skip:
            return None
        return sum(self._losses.values()) / len(self._losses), batch_fingerprint(batch)

    def _account_decided(self, prepared: Prepared) -> None:
        num_mb = self.cfg.train.num_microbatches
        if prepared.skip:
            self._account_dropped(AttemptKey(0, 0), "nonfinite_grad", "step skipped by every stage")
            return
        self.stats["committed"] += num_mb
        self.host.metrics.microbatches_committed.inc(num_mb)

    async def _drive(self, key: AttemptKey) -> None:
        """Launch microbatches as slots free up (launch_order) and wait for all of them."""
        num_mb = self.cfg.train.num_microbatches
        for mb, after in launch_order(num_mb, self.cfg.train.max_in_flight):
            if after is not None:
                await self._pending[after]
            if self._failure is not None:
                raise AttemptAborted(f"{self._failure[0]}: {self._failure[1]}")
            self.paths.pin("train", mb, route_for(mb, self.cfg.model.num_stages, swaps=self.cfg.swaps))
            if not await self._start(key, self._train_meta(key, mb)) and self._failure is not None:
                raise AttemptAborted(self._failure[1])  # else it is being sent again around a lost member
        while True:  # until every microbatch is back, also those sent again meanwhile
            waited = dict(self._pending)
            await asyncio.gather(*waited.values())
            if all(self._pending[mb] is fut for mb, fut in waited.items()):
                return

    def stage0_group(self) -> list[tuple[str, float]]:
        """Stage 0's group for an attempt: us (the lead), then its followers; each is the origin of the microbatches
        the balancer gives it, all average and apply the same step, each follower ready to take over."""
        own = self.host.peer_id
        return [(own, 0.0)] + [m for m in self.host.routes.members(0) if m[0] != own]

    def note_commit_norms(self, norms: dict[int, tuple[int, float, float]]) -> None:
        """A follower of stage 0's group: the norms its lead kept for the last committed step."""
        self.commit.commit_norms.update(norms)

    def _meta(self, key: AttemptKey, mb: int, kind: str) -> dict[str, Any]:
        """A hop's metadata; `route` is the order of transformer stages it visits (swapped on odd training
        microbatches under checkfree+, always in order for validation)."""
        route = route_for(mb, self.cfg.model.num_stages, swaps=self.cfg.swaps and kind == "train")
        meta = {"run": self.host.run_id, "step": key.step, "attempt": key.attempt, "mb": mb,
                "num_mb": self.cfg.train.num_microbatches, "generation": self.host.generation,
                "driver": self.host.peer_id,
                "from_stage": 0, "to_stage": route[0], "kind": kind, "route": list(route)}
        if kind == "train" and self.reroutes.of(mb):
            meta["inc"] = self.reroutes.of(mb)
        return meta

    def _train_meta(self, key: AttemptKey, mb: int) -> dict[str, Any]:
        """A training microbatch's first hop, with the members its attempt pinned: its path and its origin."""
        meta = self._meta(key, mb, "train")
        meta["path"] = self.paths.path("train", mb)
        meta["origin"] = self.paths.origin("train", mb)
        return meta

    @property
    def commit_norms(self) -> dict[int, tuple[int, float, float]]:
        return self.commit.commit_norms

    async def admit(self, peer_id: str, stage: int, generation: int) -> dict[str, Any]:
        """rpc_admit: a newcomer of a stage group; answered at the next step boundary (train/admission.py)."""
        return await self.admissions.request(peer_id, stage, generation)

    def _abort(self, key: AttemptKey, reason: str, detail: str) -> None:
        self.host.metrics.steps_aborted.labels(reason=reason).inc()
        num_mb = self._account_dropped(key, reason, detail)
        self.host.events.emit("step_aborted", step=key.step, attempt=key.attempt, reason=reason,
                              detail=detail[:300], microbatches_dropped=num_mb)

    def _account_dropped(self, key: AttemptKey, reason: str, detail: str) -> int:
        num_mb = self.cfg.train.num_microbatches
        self.stats["dropped"] += num_mb
        self.host.metrics.microbatches_dropped.labels(reason=reason).inc(num_mb)
        return num_mb

    # -- validation --------------------------------------------------------------------------------------

    async def validate(self) -> float:
        """Mean loss over the held-out batches, forward only, in ring order."""
        from cfnode.model.data import validation_batches

        train, host = self.cfg.train, self.host
        worker = host.worker
        assert worker is not None
        batches = validation_batches(self.val_tokens, num_batches=train.val_batches,
                                     microbatch_size=train.microbatch_size, seq_len=self.cfg.model.seq_len)
        key = AttemptKey(worker.step, self._new_attempt_id())
        loop = asyncio.get_running_loop()
        members = {i: host.routes.members(i) for i in range(1, self.cfg.model.num_stages + 1)}
        if not all(members.values()):
            return math.nan
        self.paths.start(members)
        self._val_key = key
        self._val_targets = batches[:, :, 1:]
        self._val_pending = {i: loop.create_future() for i in range(len(batches))}
        try:
            for i in range(len(batches)):
                hidden = await host.compute(worker.eval_embed, batches[i, :, :-1])
                meta = self._meta(key, i, "val")
                meta["path"] = self.paths.pin("val", i, meta["route"])
                if not await host.send_hop("forward", meta, hidden, meta["to_stage"]):
                    raise AttemptAborted("validation forward failed")
            losses = await within(asyncio.gather(*self._val_pending.values()), train.step_timeout_s)
        except (AttemptAborted, TimeoutError, asyncio.TimeoutError) as e:
            logger.warning("validation at step %d failed: %s", worker.step, e)
            return math.nan
        finally:
            self._val_key = None
            for fut in self._val_pending.values():
                fut.cancel()
        val = float(sum(losses) / len(losses))
        host.metrics.validation_loss.set(val)
        logger.info("step %d validation loss %.4f", worker.step, val)
        return val

    _val_targets: torch.Tensor | None = None

    def lost_groups(self) -> tuple[tuple[int, int], ...]:
        return self.suspects.lost_groups()
