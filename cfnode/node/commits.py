"""A transformer stage's side of stage 0's two-phase commit (docs/protocol.md): `prepare` (in a stage group: the
members' gradient all-reduce first; then clip, report the norms), `apply` (the Adam step, or a skip), both idempotent per attempt; and the step check every message of
an attempt passes (`stale_step`, or `behind`: this stage missed a commit and steps down to be rebuilt).

One job: a step is applied exactly once here, or the stage stops serving. It sees the node through
`CommitHost`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from cfnode.errors import InvalidPayload, PeerUnavailableError, RejectedError
from cfnode.recovery import copies
from cfnode.train.averaging import AveragingError, GroupAverager
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import NonFiniteGradient, StageWorker, worker_holds

logger = logging.getLogger(__name__)
REPLIES_KEPT = 4
"""Applied commits whose replies are kept for a retried call (stage 0 retries the one step in flight)."""


class CommitHost(copies.CopyHost, Protocol):
    """What the commit handler needs from the node besides what copies need."""

    peer_id: str
    driving: bool
    """Stage 0's lead: it commits its own stage (train/commit.py); a follower of stage 0's group is committed
    like any member."""

    def after_commit(self, norm: float, raw: float) -> None: ...
    def note_commit_norms(self, norms: dict[int, tuple[int, float, float]]) -> None: ...
    def fence(self) -> None: ...
    def group_averager(self) -> GroupAverager: ...
    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]: ...


class CommitHandler:
    def __init__(self, host: CommitHost) -> None:
        self.host = host
        self._replies: dict[AttemptKey, asyncio.Future[dict[str, Any]]] = {}
        """Replies to applied commits by attempt (the last few), so a retried commit is answered again."""
        self._behind_check_running = False
        self._preparing: dict[AttemptKey, asyncio.Future[tuple[float, float, str]]] = {}
        self.last_attempt = -1
        """The newest attempt id any commit message named (a follower of stage 0's group takes over past it)."""

    async def accept(self, meta: dict[str, Any], peer_id: str) -> dict[str, Any]:
        """`prepare`: all backward passes of the attempt are in; clip and report the norms (nothing applied; a
        non-finite norm is `nonfinite_grad`). `apply`: the Adam step (or, with `skip`, the step passes without
        an update everywhere). Both are idempotent: an attempt already prepared or applied is answered again
        with the same result, so stage 0 retries until every stage confirmed."""
        host = self.host
        worker = host.worker
        if worker is None or host.stage is None or host.driving:
            raise InvalidPayload("not_ready", "no stage to commit" if not host.driving else "this is the driver")
        key = AttemptKey(meta["step"], meta["attempt"])
        self.last_attempt = max(self.last_attempt, key.attempt)
        num_mb = host.config.train.num_microbatches
        if meta["num_mb"] != num_mb:
            raise InvalidPayload("decode", f"commit of {meta['num_mb']} microbatches, this run has {num_mb}")
        if meta.get("phase") == "prepare":
            self.check_step(worker, key)
            group, samples, rounds = self._group_of(meta, num_mb)
            try:
                if len(group) <= 1:
                    norm, raw = await host.compute(worker.prepare, key, samples)
                    digest = ""
                else:
                    norm, raw, digest = await self.prepare_in_group(key, group, samples, rounds)
            except NonFiniteGradient as e:
                raise InvalidPayload("nonfinite_grad", str(e)) from e
            except ValueError as e:
                raise InvalidPayload("stale_step", str(e), holds=worker_holds(worker)) from e
            except AveragingError as e:
                raise InvalidPayload("averaging", str(e)) from e
            return {"grad_norm": norm, "grad_norm_raw": raw, "step": worker.step, "grad_digest": digest}
        pending = self._replies.get(key)
        if pending is not None:  # a retry: the same answer, also while the first call still runs
            return await asyncio.shield(pending)
        if key.step > worker.step:
            self.check_step(worker, key)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[key] = fut
        while len(self._replies) > REPLIES_KEPT:
            self._replies.pop(next(iter(self._replies)))
        if host.stage == 0:
            host.note_commit_norms(_commit_norms(meta.get("norms")))
        try:
            reply = await self._apply(worker, key, skip=bool(meta.get("skip", False)))
        except BaseException as e:
            self._replies.pop(key, None)
            fut.set_exception(e)
            fut.exception()  # retrieved: a concurrent retry re-raises it, nobody else must
            raise
        fut.set_result(reply)
        return reply

    def _group_of(self, meta: dict[str, Any], num_mb: int) -> tuple[list[str], int, int]:
        """Stage groups: the members stage 0 routed this attempt's microbatches over (us included), how many of
        them came through us, and the all-reduce rounds asked for. Without `group`: a stage held alone ([])."""
        group = meta.get("group")
        if group is None:
            return [], num_mb, 1
        samples, rounds = meta.get("samples"), meta.get("rounds", 1)
        if (not isinstance(group, list) or not all(isinstance(g, str) for g in group)
                or self.host.peer_id not in group or len(set(group)) != len(group)
                or len(group) > self.host.config.group.replicas):
            raise InvalidPayload("decode", f"commit group must list distinct members, us included, at most "
                                           f"{self.host.config.group.replicas}")
        if type(samples) is not int or not 0 <= samples <= num_mb or rounds not in (1, 2):
            raise InvalidPayload("decode", f"commit samples must be 0..{num_mb} and rounds 1 or 2")
        return group, samples, rounds

    async def prepare_in_group(self, key: AttemptKey, group: list[str], samples: int,
                               rounds: int) -> tuple[float, float, str]:
        """Average the members' gradients (train/averaging.py), then clip and measure the group's gradient; a
        retried prepare of the same attempt is answered from the first. Stage 0's lead calls it for its own
        group (train/commit.py)."""
        worker = self.host.worker
        assert worker is not None
        pending = self._preparing.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[tuple[float, float, str]] = asyncio.get_running_loop().create_future()
        self._preparing = {key: fut}  # one attempt at a time: an older one is over
        try:
            result = await self._average_and_prepare(worker, key, group, samples, rounds)
        except BaseException as e:
            self._preparing.pop(key, None)
            fut.set_exception(e)
            fut.exception()
            raise
        fut.set_result(result)
        return result

    async def _average_and_prepare(self, worker: StageWorker, key: AttemptKey, group: list[str], samples: int,
                                   rounds: int) -> tuple[float, float, str]:
        host = self.host
        num_mb = host.config.train.num_microbatches
        if worker.prepared is not None and worker.prepared[0] == key:
            return worker.prepared[1], worker.prepared[2], worker.prepared_digest
        averager = host.group_averager()
        tag = (key.step, key.attempt)
        started = time.perf_counter()
        if samples == 0:  # no microbatch came through us: the attempt starts here, with a zero gradient
            await host.compute(worker.begin, key)
        vector = await host.compute(worker.gradient_vector, key, samples)
        total = (await averager.average(vector, weight=float(samples), group=group, tag=tag)) * num_mb
        if rounds == 2:  # the members' float32 roundings disagreed: average those (exact for neighbours)
            total = await averager.average(total.float().double(), weight=1.0, group=group, tag=tag)
        host.metrics.averaging_duration.observe(time.perf_counter() - started)
        return await host.compute(worker.prepare_averaged, key, total)

    async def _apply(self, worker: StageWorker, key: AttemptKey, *, skip: bool) -> dict[str, Any]:
        host = self.host
        try:
            norm, raw = await host.compute(worker.apply, key, skip=skip)
        except ValueError as e:
            raise InvalidPayload("stale_step", str(e), holds=worker_holds(worker)) from e
        host.after_commit(worker.grad_norm, worker.grad_norm_raw)
        reply = {"grad_norm": norm, "grad_norm_raw": raw, "step": worker.step, "skipped": skip}
        if host.stage == 0:  # a follower of stage 0's group: its lead pushes the copies and saves checkpoints
            return reply
        if host.config.recovery.mode == "redundant" and not skip:  # the shadow on our predecessor follows
            state = await host.compute(worker.snapshot)
            await copies.push_copies(host, state, copies.replica_meta(
                host, step=worker.step, grad_norm=norm, grad_norm_raw=raw))
        reply.update(await copies.save_checkpoint(host))
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
                self.host.spawn(self._confirm_behind(worker), "confirm-behind")
            raise InvalidPayload("behind", f"attempt {tuple(key)} is for step {key.step}; this stage has only "
                                           f"committed {worker.step} steps")

    async def _confirm_behind(self, worker: StageWorker) -> None:
        """Ask stage 0 (not the neighbour that sent the hop) how many steps it committed; step down if more than
        we did."""
        host = self.host
        try:
            assert host.client is not None
            info = await host.client.info(host.route(0))
            theirs = info.get("step")
            if isinstance(theirs, int) and theirs > worker.step and host.worker is worker:
                logger.warning("stage 0 committed %d steps, this stage only %d (a commit was lost); stepping "
                               "down so that the stage is rebuilt", theirs, worker.step)
                host.events.emit("behind", stage=host.stage, step=worker.step, stage0_step=theirs)
                host.fence()
        except (PeerUnavailableError, RejectedError) as e:
            logger.info("could not confirm with stage 0 that this stage is behind: %s", e)
        finally:
            self._behind_check_running = False


def _commit_norms(raw: Any) -> dict[int, tuple[int, float, float]]:
    """The transformer stages' committed norms a stage-0 lead sends its followers with each apply ({"stage":
    [steps, norm, raw]}), so that a follower that takes over weighs a rebuild's donors as the lead would have;
    anything malformed is left out."""
    out: dict[int, tuple[int, float, float]] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            if (isinstance(key, str) and key.isdigit() and isinstance(value, list) and len(value) == 3
                    and type(value[0]) is int and all(isinstance(v, (int, float)) for v in value[1:])):
                out[int(key)] = (value[0], float(value[1]), float(value[2]))
    return out
