"""Rebuilding a lost stage: plan (pure) -> fetch the neighbours' weights -> check them -> apply the rule.

`plan_recovery` decides which surviving stages to rebuild from; `Rebuilder` runs the plan with injected I/O
(`fetch(stage_idx)` returns a stage's weights and metadata), so it is testable without sockets. Nothing is
installed unless every fetched tensor passed its checks (shape, dtype, finite, model-config hash, a
plausible post-clip gradient norm).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cfnode.errors import RecoveryError, UnrecoverableError
from cfnode.recovery.checkfree import Neighbour, StateDict, check_compatible, copy_of, rebuild
from cfnode.train.schedule import swap_partner

logger = logging.getLogger(__name__)

T = TypeVar("T")
Fetch = Callable[[int], Awaitable[tuple[dict[str, Any], dict[str, torch.Tensor]]]]


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    prev_source: int | None
    """Nearest surviving transformer stage below (None: none survives)."""
    next_source: int | None
    """Nearest surviving transformer stage above."""
    kind: str = "neighbours"
    """`neighbours` (the rule over the nearest survivors), `partner` (CheckFree+ copy of the swap partner) or
    `replica` (CheckFree+ stage 0 from a replica on stage 1 or L)."""
    replica_sources: tuple[int, ...] = ()

    @property
    def degraded(self) -> bool:
        """Not a textbook case: both direct neighbours, the swap partner, or a replica."""
        if self.kind in ("partner", "replica"):
            return False
        return self.prev_source != self.stage - 1 or self.next_source != self.stage + 1


def plan_recovery(stage_idx: int, live_stages: set[int], num_stages: int, *, swaps: bool = False,
                  fresh: frozenset[int] | set[int] = frozenset(),
                  replicas: frozenset[int] | set[int] = frozenset()) -> RecoveryPlan:
    """Which stages to rebuild `stage_idx` from.

    `live_stages` have an ONLINE owner; `fresh` ones were themselves rebuilt and have not committed since (used
    only when nothing else survives, so two adjacent losses are both rebuilt from the same survivors);
    `replicas` are live stages holding a copy of the lost one (CheckFree+: stages 1 and L keep stage 0; the
    `redundant` baseline: every stage's predecessor keeps it). A stage with a live copy is restored from it;
    stage 0 without one is unrecoverable. With CheckFree+ a swap-pair stage copies its partner. Any other stage
    uses the nearest eligible transformer stage on each side (stage 0 never, its shapes differ): both direct
    neighbours is plain CheckFree; one side only is a copy (degraded); farther survivors are weighted by
    distance (docs/recovery.md).
    """
    if not 0 <= stage_idx <= num_stages:
        raise ValueError(f"stage {stage_idx} outside 0..{num_stages}")
    holders = tuple(sorted(s for s in set(replicas) & set(live_stages) if 0 <= s <= num_stages and s != stage_idx))
    if holders:
        return RecoveryPlan(stage_idx, None, None, kind="replica", replica_sources=holders)
    if stage_idx == 0:
        if not swaps and not replicas:
            raise UnrecoverableError("stage 0 (embedding, final norm, LM head) was lost and cannot be rebuilt "
                                     "without checkfree+ (its replicas on stages 1 and L)")
        raise UnrecoverableError("stage 0 was lost and no live stage holds a replica of it")
    survivors = {s for s in live_stages if 1 <= s <= num_stages and s != stage_idx}
    eligible = (survivors - set(fresh)) or survivors
    partner = swap_partner(stage_idx, num_stages) if swaps else None
    if partner is not None and partner in survivors:  # even a fresh partner: it may be the lost stage's own copy
        side = (partner, None) if partner < stage_idx else (None, partner)
        return RecoveryPlan(stage_idx, *side, kind="partner")
    below = [s for s in eligible if s < stage_idx]
    above = [s for s in eligible if s > stage_idx]
    return RecoveryPlan(stage_idx, max(below) if below else None, min(above) if above else None)


@dataclass
class RecoveryResult:
    state: dict[str, torch.Tensor]
    how: str
    step: int
    fetch_s: float
    sources: dict[str, int]
    average_s: float = 0.0
    neighbours: dict[str, Neighbour] = field(default_factory=dict)
    """The checked donor weights and norms the rule was applied to (kept for --audit-recovery)."""


def check_meta(meta: dict[str, Any], *, stage: int, config_hash: str, clip_norm: float) -> tuple[float, int]:
    """Validate a donor's metadata; returns (post-clip grad norm, step)."""
    if meta.get("config_hash") != config_hash:
        raise RecoveryError(f"stage {stage} donor has model config {meta.get('config_hash')}, ours is {config_hash}")
    if meta.get("stage") != stage:
        raise RecoveryError(f"asked stage {stage} for weights, got stage {meta.get('stage')}'s")
    norm, step = meta.get("grad_norm"), meta.get("step")
    if isinstance(norm, bool) or isinstance(step, bool):
        raise RecoveryError(f"stage {stage} reports a boolean grad norm or step")
    if not isinstance(norm, (int, float)) or not math.isfinite(norm) or not 0 <= norm <= clip_norm * 1.001:
        raise RecoveryError(f"stage {stage} reports an impossible post-clip gradient norm {norm!r} "
                            f"(clip is {clip_norm})")
    if not isinstance(step, int) or step < 0:
        raise RecoveryError(f"stage {stage} reports step {step!r}")
    return float(norm), step


class Rebuilder:
    def __init__(self, *, rule: str, config_hash: str, clip_norm: float, fetch: Fetch,
                 norm_power: float = 1.0, fetch_replica: Fetch | None = None,
                 norms: Mapping[int, tuple[int, float]] | None = None) -> None:
        self.rule = rule
        self.config_hash = config_hash
        self.clip_norm = clip_norm
        self.fetch = fetch
        self.fetch_replica = fetch_replica
        self.norm_power = norm_power
        self.norms = dict(norms or {})
        """{stage: (steps committed, post-clip norm)} as the stages reported them to stage 0 in their commits:
        a donor's weight in the average comes from here when known, never from the donor itself."""

    async def run(self, plan: RecoveryPlan, fresh: StateDict, *, known_step: int = 0) -> RecoveryResult:
        """Fetch the plan's donors concurrently (the first failure cancels the other fetch), check them and
        apply the rule. `known_step` is the highest step the membership view reports; the rebuilt stage
        resumes at max(known_step, donors' steps)."""
        if plan.kind == "replica":
            return await self._from_replica(plan, fresh, known_step=known_step)
        started = time.perf_counter()
        sides = {"prev": plan.prev_source, "next": plan.next_source}
        wanted = {side: idx for side, idx in sides.items() if idx is not None}
        rule = self.rule
        if not wanted:
            logger.warning("no transformer stage survives to rebuild stage %d from; using the seeded init",
                           plan.stage)
            rule = "random"
        if rule == "random":
            wanted = {}
        fetched = await _gather_or_cancel([self.fetch(idx) for idx in wanted.values()])
        fetch_s = time.perf_counter() - started
        neighbours: dict[str, Neighbour] = {}
        steps = [known_step]
        donor_steps = []
        for (side, idx), (meta, state) in zip(wanted.items(), fetched, strict=True):
            norm, step = check_meta(meta, stage=idx, config_hash=self.config_hash, clip_norm=self.clip_norm)
            if idx in self.norms:
                recorded_step, norm = self.norms[idx]
                if recorded_step != step:
                    raise RecoveryError(f"stage {idx}'s weights are at step {step} but stage 0 recorded its "
                                        f"gradient norm at step {recorded_step}")
            elif self.norms:
                logger.warning("stage 0 has no committed norm of stage %d; using the norm it reports", idx)
            neighbours[side] = Neighbour(state=state, grad_norm=norm, distance=abs(idx - plan.stage), step=step)
            steps.append(step)
            donor_steps.append(step)
        if len(set(donor_steps)) > 1:
            raise RecoveryError(f"the donors of stage {plan.stage} are at different steps {donor_steps}: "
                                "their average would mix two updates")
        averaged = time.perf_counter()
        try:
            state, how = rebuild(rule, prev=neighbours.get("prev"), nxt=neighbours.get("next"), fresh=fresh,
                                 power=self.norm_power)
        except ValueError as e:
            raise RecoveryError(f"cannot rebuild stage {plan.stage}: {e}") from e
        if plan.kind == "partner" and how.startswith("copy"):
            how = "partner-copy"
        return RecoveryResult(state=state, how=how, step=max(steps), fetch_s=fetch_s, sources=wanted,
                              average_s=time.perf_counter() - averaged, neighbours=neighbours)


    async def _from_replica(self, plan: RecoveryPlan, fresh: StateDict, *, known_step: int) -> RecoveryResult:
        """A stage from the freshest copy that arrives intact (one failed holder is tolerated)."""
        if self.fetch_replica is None:
            raise RecoveryError("no replica fetcher configured")
        started = time.perf_counter()
        results = await asyncio.gather(*(self.fetch_replica(idx) for idx in plan.replica_sources),
                                       return_exceptions=True)
        fetch_s = time.perf_counter() - started
        candidates: list[tuple[int, int, Neighbour]] = []
        errors: list[str] = []
        for idx, got in zip(plan.replica_sources, results, strict=True):
            if isinstance(got, BaseException):
                errors.append(f"stage {idx}: {got}")
                continue
            meta, state = got
            try:
                norm, step = check_meta(meta, stage=plan.stage, config_hash=self.config_hash,
                                        clip_norm=self.clip_norm)
                check_compatible(fresh, state, what=f"replica on stage {idx}")
            except (RecoveryError, ValueError) as e:
                errors.append(f"stage {idx}: {e}")
                continue
            candidates.append((step, -idx, Neighbour(state=state, grad_norm=norm, step=step)))
        if not candidates:
            raise RecoveryError(f"no usable replica of stage {plan.stage}: {'; '.join(errors)}")
        step, neg_idx, best = max(candidates, key=lambda c: (c[0], c[1]))
        if step < known_step:
            logger.warning("the freshest replica of stage %d is at step %d but the swarm committed step %d; it "
                           "misses %d update(s)", plan.stage, step, known_step, known_step - step)
        averaged = time.perf_counter()
        state = copy_of(best)
        return RecoveryResult(state=state, how="replica", step=max(step, known_step), fetch_s=fetch_s,
                              sources={"replica": -neg_idx}, average_s=time.perf_counter() - averaged,
                              neighbours={"replica": best})


async def _gather_or_cancel(coros: list[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest (a dead donor must not leave a download running)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    if failed:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed[0].exception()  # type: ignore[misc]
    return [t.result() for t in tasks]
