"""An in-memory all-reduce for stage groups: the `GroupAverager` of train/averaging.py over one shared hub per
cluster, on the virtual-time loop (nothing sleeps for real, nothing runs in another thread).

A member's `average(vector, weight=, group=, tag=)` submits to the open round of (prefix, len(group), tag) and
waits until every peer of `group` submitted to it; the round then "reduces" for `reduce_s` of virtual time (the
real one takes 90-230 ms for a tiny stage, docs/groups.md) and hands every member the same float64 result,
sum(w_i v_i) / sum(w_i) summed in sorted-peer order (all weights 0: NaN, as hivemind's 0/0). What hivemind does
that matters to the protocol, and what this models:

* a round completes with all of its `size` members or not at all: a member that has not submitted within its
  `timeout_s` withdraws and raises `AveragingError`; the others keep waiting until their own deadlines;
* a killed node never submits (its I/O fails); a stalled one submits only once thawed, and a stalled member
  holds up the reduce (the others' deadlines still run);
* a member that dies, is cancelled (its handler went away with its node), times out or closes its averager
  after the round filled and before the results are delivered fails the round for everyone (hivemind's
  all-reduce with `allow_retries=False`: a peer that vanishes mid-round fails its partners' step);
* every member checks the round had exactly its `group` at its tag (`check_gathered`, the real check).

Hooks (`AverageHook`) run when a member submitted ("submitted") and when a round filled, before its reduce
("reducing"): the fault plan kills or stalls members there (plan.py `OnAverage`). `log` records every round's
outcome for the trace.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cfnode.testing.clock import next_order, virtual_now
from cfnode.testing.faults import Peers
from cfnode.train.averaging import AveragerFactory, AveragingError, GroupAverager, check_gathered

logger = logging.getLogger(__name__)
STALL_POLL_S = 0.05
"""How often a filled round whose member is stalled looks again whether it can reduce."""

RoundKey = tuple[str, int, tuple[int, int]]


@dataclass(frozen=True)
class AverageCall:
    """What a hook sees: the phase, the round and the member it is about (the submitter, or None once filled)."""

    phase: str
    prefix: str
    tag: tuple[int, int]
    peer: str | None
    members: tuple[str, ...]


AverageHook = Callable[[str, AverageCall], None]


@dataclass(frozen=True)
class RoundOutcome:
    """One round as it ended: averaged, failed (why), or withdrawn (a member left an unfilled round)."""

    time: float
    prefix: str
    size: int
    tag: tuple[int, int]
    members: tuple[str, ...]
    outcome: str
    order: int = field(default_factory=next_order, compare=False)


@dataclass
class _Submission:
    vector: torch.Tensor
    weight: float
    group: tuple[str, ...]
    result: asyncio.Future[torch.Tensor]


@dataclass
class _Round:
    key: RoundKey
    subs: dict[str, _Submission] = field(default_factory=dict)
    state: str = "open"  # open -> reducing -> done

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(sorted(self.subs))


def weighted_average(subs: dict[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
    """sum(w_i v_i) / sum(w_i) in float64, accumulated in sorted-peer order (deterministic)."""
    peers = sorted(subs)
    acc = torch.zeros_like(subs[peers[0]][0], dtype=torch.float64)
    total = 0.0
    for p in peers:
        vector, weight = subs[p]
        acc.add_(vector.to(torch.float64), alpha=weight)
        total += weight
    return acc / total if total else torch.full_like(acc, float("nan"))


class AverageHub:
    """The rounds of every group of one cluster; `factory(peer_id)` is a node's `AveragerFactory`."""

    def __init__(self, peers: Peers, *, seed: int = 0, reduce_s: tuple[float, float] = (0.02, 0.2)) -> None:
        self.peers = peers
        self.hooks: list[AverageHook] = []
        self.log: list[RoundOutcome] = []
        self._open: dict[RoundKey, _Round] = {}
        self._rng = random.Random(f"{seed}:average")
        self._reduce_s = reduce_s

    def factory(self, peer_id: str) -> AveragerFactory:
        def make(*, prefix: str, size: int, timeout_s: float, matchmaking_s: float, own_peer: str) -> GroupAverager:
            if own_peer != peer_id:
                raise ValueError(f"averager of {own_peer[:12]} requested by node {peer_id[:12]}")
            return MemoryAverager(self, prefix=prefix, timeout_s=timeout_s, own_peer=own_peer)

        return make

    def outcomes(self, outcome_prefix: str = "") -> list[RoundOutcome]:
        return [r for r in self.log if r.outcome.startswith(outcome_prefix)]

    # -- rounds ------------------------------------------------------------------------------------------

    def submit(self, key: RoundKey, peer: str, sub: _Submission) -> _Round:
        """Enter the open round of `key` (a new one if none is open); fills it when the last member is in."""
        rnd = self._open.get(key)
        if rnd is None:
            rnd = self._open[key] = _Round(key)
        if peer in rnd.subs:
            raise AveragingError(f"{peer[:12]} is in the round of {key[0]} at {key[2]} already")
        rnd.subs[peer] = sub
        self._run_hooks("submitted", rnd, peer)
        if len(rnd.subs) == key[1] and rnd.state == "open":
            rnd.state = "reducing"
            del self._open[key]
            self._run_hooks("reducing", rnd, None)
            asyncio.get_running_loop().call_later(self._rng.uniform(*self._reduce_s), self._try_deliver, rnd)
        return rnd

    def _run_hooks(self, phase: str, rnd: _Round, peer: str | None) -> None:
        call = AverageCall(phase, rnd.key[0], rnd.key[2], peer, rnd.members)
        for hook in list(self.hooks):
            hook(phase, call)

    def withdraw(self, rnd: _Round, peer: str, why: str) -> None:
        """A member leaves: from an unfilled round it just withdraws; a filled one fails for everyone."""
        if rnd.state == "open":
            if rnd.subs.pop(peer, None) is not None:
                self._note(rnd, f"withdrawn: {peer[:12]} {why}", members=(peer,))
                if not rnd.subs and self._open.get(rnd.key) is rnd:
                    del self._open[rnd.key]
        elif rnd.state == "reducing":
            self.fail(rnd, f"{peer[:12]} {why} during the all-reduce")

    def fail(self, rnd: _Round, why: str) -> None:
        if rnd.state == "done":
            return
        rnd.state = "done"
        self._note(rnd, f"failed: {why}")
        for sub in rnd.subs.values():
            if not sub.result.done():
                sub.result.set_exception(AveragingError(f"the all-reduce round failed: {why}"))
                sub.result.exception()  # retrieved: a member that already left must not warn

    def _try_deliver(self, rnd: _Round) -> None:
        if rnd.state != "reducing":
            return
        dead = [p for p in rnd.members if self.peers.is_dead(p)]
        if dead:
            self.fail(rnd, f"{dead[0][:12]} died during the all-reduce")
            return
        if any(self.peers.is_stalled(p) for p in rnd.members):  # its part of the reduce waits for it
            asyncio.get_running_loop().call_later(STALL_POLL_S, self._try_deliver, rnd)
            return
        result = weighted_average({p: (s.vector, s.weight) for p, s in rnd.subs.items()})
        rnd.state = "done"
        self._note(rnd, "averaged")
        for sub in rnd.subs.values():
            if not sub.result.done():
                sub.result.set_result(result.clone())

    def _note(self, rnd: _Round, outcome: str, members: tuple[str, ...] | None = None) -> None:
        prefix, size, tag = rnd.key
        self.log.append(RoundOutcome(virtual_now(), prefix, size, tag, members or rnd.members, outcome))
        logger.debug("all-reduce %s g%d %s: %s", prefix, size, tag, outcome)


class MemoryAverager:
    """One node's `GroupAverager` for one stage (train/averaging.py's contract, over an `AverageHub`)."""

    def __init__(self, hub: AverageHub, *, prefix: str, timeout_s: float, own_peer: str) -> None:
        self.hub, self.prefix, self.timeout_s, self.own_peer = hub, prefix, timeout_s, own_peer
        self.closed = False
        self._waiting: list[tuple[_Round, _Submission]] = []

    async def average(self, vector: torch.Tensor, *, weight: float, group: Sequence[str],
                      tag: tuple[int, int]) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        peers, me = self.hub.peers, self.own_peer
        try:
            await asyncio.wait_for(peers.gate(me), self.timeout_s)  # a stalled node submits once thawed
        except (TimeoutError, asyncio.TimeoutError):
            raise AveragingError(f"no all-reduce round with {len(group)} members within {self.timeout_s:g} s "
                                 "(this node was frozen)") from None
        if self.closed:
            raise AveragingError("the averager is closed")
        key: RoundKey = (self.prefix, len(group), (int(tag[0]), int(tag[1])))
        sub = _Submission(vector.detach().to(torch.float64).clone(), float(weight), tuple(group),
                          loop.create_future())
        rnd = self.hub.submit(key, me, sub)
        entry = (rnd, sub)
        self._waiting.append(entry)
        try:
            try:
                result = await asyncio.wait_for(asyncio.shield(sub.result), max(0.0, deadline - loop.time()))
            except (TimeoutError, asyncio.TimeoutError):
                self.hub.withdraw(rnd, me, "timed out")
                if sub.result.done() and not sub.result.cancelled() and sub.result.exception() is None:
                    result = sub.result.result()  # delivered at the very instant of the deadline
                else:
                    raise AveragingError(f"no all-reduce round with {len(group)} members within "
                                         f"{self.timeout_s:g} s") from None
            except asyncio.CancelledError:
                self.hub.withdraw(rnd, me, "went away")
                raise
        finally:
            self._waiting.remove(entry)
        await peers.gate(me)  # the result reaches a frozen node once it is thawed
        check_gathered({p: {"peer": p, "step": tag[0], "attempt": tag[1]} for p in rnd.members}, group, tag)
        return result

    async def warm(self, group_size: int) -> None:
        return None  # nothing to start in memory

    def close(self) -> None:
        """hivemind's shutdown: the averager's process is gone; a round it was in fails (or loses it)."""
        self.closed = True
        for rnd, sub in list(self._waiting):
            self.hub.withdraw(rnd, self.own_peer, "closed its averager")
            if not sub.result.done():
                sub.result.set_exception(AveragingError("the averager was closed"))
                sub.result.exception()
