"""Stage 0's side of the two-phase commit of one attempt (docs/protocol.md): `prepare_all` asks every member of
every stage group (stage 0 too) to clip and report its norms, a group's members averaging their gradients first
(node/commits.py); `apply_all` then applies everywhere, stage 0 first, each member retried until it confirmed or
left its group. It keeps the norms each stage reported for its last committed step (a rebuild weighs donors by
them) and which groups need a second all-reduce round after their members disagreed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.errors import AttemptAborted, PeerUnavailableError, RejectedError
from cfnode.recovery import copies, store
from cfnode.train.averaging import AveragingError
from cfnode.train.replica_stream import ReplicaStream
from cfnode.train.worker import NonFiniteGradient

if TYPE_CHECKING:
    from cfnode.net.records import SwarmView
    from cfnode.train.paths import AttemptPaths
    from cfnode.train.schedule import AttemptKey

logger = logging.getLogger(__name__)
COMMIT_RETRY_S = 0.2


class GroupDiverged(AttemptAborted):
    """The members of a stage group reported different averaged gradients: the attempt is retried with a second
    all-reduce round for that group."""


@dataclass(frozen=True)
class Prepared:
    """Phase 1's outcome: who prepared (stage -> its group's members, lead first), their norms (each group's
    members report the same), and whether the step is skipped."""

    peers: dict[int, tuple[str, ...]]
    norms: dict[int, tuple[float, float]]
    skip: bool

    @property
    def leads(self) -> dict[int, str]:
        return {i: ms[0] for i, ms in self.peers.items() if ms}



class CommitHost(copies.CopyHost, Protocol):
    peer_id: str

    @property
    def view(self) -> SwarmView: ...
    async def prepare_in_group(self, key: AttemptKey, group: list[str], samples: int,
                               rounds: int) -> tuple[float, float, str]: ...
    async def confirm_suspect(self, peer: str) -> bool: ...
    async def refresh_view(self) -> SwarmView: ...
    def after_commit(self, norm: float, raw: float) -> None: ...


class StepCommit:
    def __init__(self, host: CommitHost, paths: AttemptPaths, adopt: Callable[[tuple[int, int] | None], None]) -> None:
        self.host = host
        self.cfg = host.config
        self.paths = paths
        self.adopt = adopt
        self.rounds: dict[int, int] = {}
        """Stages whose members' gradients disagreed after the all-reduce: the retry averages twice."""
        self.suspects: list[str] = []
        """Members a commit call could not reach: the driver pings them (train/driver.py)."""
        self.commit_norms: dict[int, tuple[int, float, float]] = {}
        """Per transformer stage: (steps committed, post-clip norm, raw norm) as it reported them when preparing
        its last committed step. A rebuild weights its donors by these, not by what the donors claim."""
        self.replicas = ReplicaStream(host)
        """checkfree+: stage 0's copies to the replica holders, streamed while the next step trains."""

    def commit_meta(self, key: AttemptKey, phase: str, *, skip: bool = False) -> dict[str, Any]:
        return {"run": self.host.run_id, "step": key.step, "attempt": key.attempt, "phase": phase, "skip": skip,
                "num_mb": self.cfg.train.num_microbatches, "generation": self.host.generation}

    async def prepare_all(self, key: AttemptKey) -> Prepared:
        """Phase 1 on every stage at once (stage 0 too): all backward passes are in; a stage group's members
        average their gradients; clip and report the norms. A non-finite norm anywhere decides a swarm-wide
        skip; any other failure raises (the attempt aborts, nothing was applied anywhere)."""
        host, worker = self.host, self.host.worker
        assert worker is not None and host.client is not None
        peers = dict(self.paths.participants)
        calls = [(idx, peer) for idx, members in peers.items() for peer in members if peer != host.peer_id]
        num_mb = self.cfg.train.num_microbatches
        group0 = self.paths.group(0)
        if len(group0) > 1:  # stage 0's group: each member took its share of the microbatches; they average
            own = asyncio.ensure_future(host.prepare_in_group(key, group0, self.paths.samples_of(0, host.peer_id),
                                                              self.rounds.get(0, 1)))
        else:
            own = asyncio.ensure_future(host.compute(worker.prepare, key, num_mb))
        results = await _until_one_unreachable([host.client.commit(peer, self._prepare_meta(key, idx, peer),
                                                                   timeout_s=self._prepare_timeout(idx))
                                                for idx, peer in calls])
        nonfinite: list[int] = []
        norms: dict[int, tuple[float, float]] = {}
        digests: dict[int, set[str]] = {}
        failure: BaseException | None = None
        try:
            mine = await own
            if len(mine) == 3:
                digests[0] = {mine[2]}
        except NonFiniteGradient:
            nonfinite.append(0)
        except AveragingError as e:
            failure = e
        for (idx, peer), result in zip(calls, results, strict=True):
            if result is None:  # not awaited: another member was unreachable
                continue
            if isinstance(result, RejectedError) and result.reason == "nonfinite_grad":
                if idx not in nonfinite:
                    nonfinite.append(idx)
            elif isinstance(result, BaseException):
                self.adopt(getattr(result, "holds", None))
                if isinstance(result, PeerUnavailableError):
                    self.suspects.append(peer)
                failure = failure or result
            else:
                norms.setdefault(idx, (float(result["grad_norm"]), float(result["grad_norm_raw"])))
                digests.setdefault(idx, set()).add(str(result.get("grad_digest", "")))
        if failure is not None:
            raise failure
        diverged = [idx for idx, d in digests.items() if len(d) > 1 and idx not in nonfinite]
        if diverged:
            for idx in diverged:
                self.rounds[idx] = 2
            logger.warning("step %d: the members of stage(s) %s hold different averaged gradients; retrying with "
                           "a second all-reduce round", key.step, diverged)
            raise GroupDiverged(f"stage(s) {diverged}: members' averaged gradients differ")
        for idx in peers:
            self.rounds.pop(idx, None)
        if nonfinite:
            logger.warning("step %d: non-finite gradient norm on stage(s) %s; every stage skips the step",
                           key.step, nonfinite)
            host.events.emit("step_skipped", step=key.step, stages=nonfinite)
        return Prepared(peers=peers, norms=norms, skip=bool(nonfinite))

    def _prepare_meta(self, key: AttemptKey, idx: int, peer: str) -> dict[str, Any]:
        meta = self.commit_meta(key, "prepare")
        group = self.paths.group(idx)
        if len(group) > 1:  # a stage group: its members average, each weighted by the microbatches it took
            meta.update(group=group, samples=self.paths.samples_of(idx, peer), rounds=self.rounds.get(idx, 1))
        return meta

    def _prepare_timeout(self, idx: int) -> float | None:
        if len(self.paths.group(idx)) <= 1:
            return None
        return self.cfg.network.request_timeout_s + 2 * self.cfg.group.averaging_timeout_s

    async def apply_all(self, key: AttemptKey, prepared: Prepared) -> None:
        """Phase 2: stage 0 applies first, then every stage, each retried until it confirmed or is no longer its
        stage's owner (then it is lost, and its rebuild starts from its neighbours, which applied). A stage that
        could not apply while staying owner is `behind` at the next step and steps down (node/commits.py): never
        a skipped update. Under checkfree+ stage 0 then streams its new weights to this step's replica holder in the
        background (`train/replica_stream.py`; stages 1 and L take turns): the fresher of the two holders' copies
        is of the last committed step or the one before, the other one step older still."""
        host, worker = self.host, self.host.worker
        assert worker is not None and host.client is not None
        norm, raw = await host.compute(worker.apply, key, skip=prepared.skip)
        host.after_commit(worker.grad_norm, worker.grad_norm_raw)
        meta = self.commit_meta(key, "apply", skip=prepared.skip)
        replicate = bool(self.replicas.holders) and not prepared.skip
        snapshot = asyncio.ensure_future(host.compute(worker.snapshot)) if replicate else None
        calls = [(idx, peer) for idx, members in prepared.peers.items() for peer in members if peer != host.peer_id]
        meta0 = meta  # stage 0's followers keep the norms too, to take over as the lead
        if prepared.peers.get(0, ())[1:]:
            meta0 = {**meta, "norms": {str(i): [key.step + 1, *n] for i, n in prepared.norms.items()}}
        results = await asyncio.gather(*(self._apply_on(idx, peer, key, meta0 if idx == 0 else meta)
                                         for idx, peer in calls))
        for (idx, _), result in zip(calls, results, strict=True):
            if result is not None and idx in prepared.norms:
                self.commit_norms[idx] = (key.step + 1, *prepared.norms[idx])
        if snapshot is not None:
            state = await snapshot
            await self.replicas.delivered()  # the previous step's copy: in long ago, unless its holder is slow
            self.replicas.start(state, copies.replica_meta(host, step=worker.step, grad_norm=norm, grad_norm_raw=raw),
                                prepared.leads)
        await self._checkpoint(failed=any(r is None for r in results), results=list(results))

    async def _apply_on(self, idx: int, peer: str, key: AttemptKey, meta: dict[str, Any]) -> dict[str, Any] | None:
        """Send the apply to one stage until it confirms; None if it stopped being the stage's owner first."""
        host = self.host
        assert host.client is not None
        rejections = 0
        while True:
            try:
                return await host.client.commit(peer, meta)
            except RejectedError as e:
                if e.holds is not None and e.holds[0] == key.step + 1:
                    return {"step": key.step + 1}  # applied already (its reply was lost)
                rejections += 1
                error: Exception = e
            except PeerUnavailableError as e:
                error = e
                if peer not in self.suspects:
                    self.suspects.append(peer)
                if await host.confirm_suspect(peer):  # a ping failed too: dead, not waited for until it expires
                    logger.warning("stage %d's member %s did not confirm step %d and fails a ping: lost", idx,
                                   peer[:12], key.step)
                    host.events.emit("commit_failed", stage=idx, step=key.step, error=str(e)[:200])
                    return None
            host.metrics.commit_retries.inc()
            await host.refresh_view()
            if all(p.peer_id != peer for p in host.view.group(idx)) or rejections >= 3:
                logger.warning("stage %d did not confirm step %d (%s); %s", idx, key.step, error,
                               "it is no longer the stage's owner" if rejections < 3 else "giving up")
                host.events.emit("commit_failed", stage=idx, step=key.step, error=str(error)[:200])
                return None
            await asyncio.sleep(COMMIT_RETRY_S)

    async def _checkpoint(self, *, failed: bool, results: list[Any]) -> None:
        """`checkpoint` baseline: after a checkpoint step, save stage 0 too and mark the step complete if every
        stage saved it."""
        saved = await copies.save_checkpoint(self.host)
        if not saved:
            return
        step = saved["checkpoint_step"]
        if failed or any(not isinstance(r, dict) or r.get("checkpoint_step") != step for r in results):
            logger.warning("checkpoint of step %d is incomplete (a stage did not save it); keeping the previous one",
                           step)
            return
        try:
            await asyncio.to_thread(store.mark_complete, copies.checkpoint_root(self.host), step,
                                    self.cfg.model.num_stages)
        except OSError as e:
            logger.error("could not mark the checkpoint of step %d complete: %s", step, e)
            return
        self.host.events.emit("checkpoint_complete", step=step)



async def _until_one_unreachable(calls: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Every call's result or exception, like `gather(return_exceptions=True)`, but as soon as one member is
    unreachable the calls still running are cancelled (None): the members of its group would otherwise wait out
    their all-reduce's timeout for it, and the attempt aborts anyway."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and isinstance(t.exception(), PeerUnavailableError) for t in done):
                break
    finally:  # also when the driver itself is cancelled: no call outlives the round, every error is retrieved
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [None if t.cancelled() else (t.exception() or t.result()) for t in tasks]
