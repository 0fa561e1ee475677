"""Seeded failure schedules for `cfnode experiment`: which node is killed after which step.

Pure functions, no I/O. The method is described in docs/experiments.md; in short:

* A node fails in a step with probability p = 1 - (1 - h)^(c * T / 3600) (h: hourly failure rate,
  T: seconds per step, c: time-compression factor), independently per node and per step. With one node per
  stage (`replicas` K = 1) a node failure is the loss of its stage. With K > 1 every stage is held by a group
  of K members (`cfnode demo --replicas K`); a stage is lost in a step only when all K of its members fail in
  that step, with probability p^K (the paper's footnote on k replicas); fewer than K failed members are member
  kills: the group carries on without them and a fresh node joins it by exact copy.
* Member slot m = 0..K-1 has its own private `random.Random`, seeded from the experiment seed, L and m (slot 0:
  the seed and L alone, as before groups existed). Each draws one uniform u per stage 0..L per step, whatever
  the strategy, rate, length of the run or K; member m of stage s fails at step t when s is at risk and u < p.
  So K = 1 is the one-node-per-stage schedule exactly, strategies with the same stages at risk get the same
  schedule, a higher rate fails wherever a lower one does (before the injection rules), a longer run extends
  a shorter one, and a larger K shares the draws of a smaller one.
* Injection rules, applied in step order: never at step 0 (nothing trained yet) or at the last step (training
  is over); at most `max_per_step` stages fail per step (a stage loss, or one or more member kills of one
  stage; default 1: the swarm rebuilds one stage per spare; stage losses first, then the smallest draw: for a
  stage loss the largest of its members' draws, for member kills the smallest); at least `min_gap` steps
  between two failure steps of either kind (training pauses while a stage is missing, and a killed member's
  replacement needs the time to boot and join, so these steps run with every group full again). Failures the
  rules drop are counted in `suppressed` (a stage loss once, each member kill once).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from cfnode.errors import ConfigError

STRATEGIES = ("none", "checkfree", "checkfree+", "uniform-avg", "copy", "random", "checkpoint", "redundant")
"""Every strategy `cfnode experiment` knows (runner.py says which ones it can run today)."""

DEFAULT_MIN_GAP = 10
DEFAULT_MAX_PER_STEP = 1
MAX_REPLICAS = 16
"""As `join --replicas` (GroupConfig): 1..16 members per stage group."""
SCHEDULE_FORMAT = 2
"""2: events carry their kind and the schedule its replicas; format 1 files (no kinds: every event is a stage
loss, one node per stage) still load."""

GROUP = "group"
"""Kill every member of the stage's group (with one node per stage, its holder): the stage is lost and a spare
rebuilds it (CheckFree, or the strategy's own recovery)."""
MEMBER = "member"
"""Kill one member of a group of K > 1: the group carries on without it, a fresh node joins it by exact copy."""
KINDS = (GROUP, MEMBER)


class Failure(NamedTuple):
    """One schedule entry: once `step` steps have committed, kill the `kind` of `stage` (a plain `(step, stage)`
    pair is a stage loss, as in schedules written before groups)."""

    step: int
    stage: int
    kind: str = GROUP


def step_probability(rate_pct: float, step_s: float, compression: float = 1.0) -> float:
    """Per-node, per-step failure probability p = 1 - (1 - h)^(c * T / 3600), h = rate_pct / 100.

    `rate_pct` is the hourly failure rate of one node in percent (5 means 5 %/h), `step_s` the seconds one
    training step takes (T), `compression` how many seconds of modelled time one real second stands for (c).
    With one node per stage this is also the stage's failure probability; with K members see
    `stage_loss_probability`.
    """
    if not 0 <= rate_pct <= 100:
        raise ConfigError(f"hourly failure rate must be in 0..100 %, got {rate_pct}")
    if not step_s > 0 or not math.isfinite(step_s):
        raise ConfigError(f"step time must be > 0 s, got {step_s}")
    if not compression > 0 or not math.isfinite(compression):
        raise ConfigError(f"time-compression factor must be > 0, got {compression}")
    h = rate_pct / 100
    if h == 1:
        return 1.0
    return -math.expm1(math.log1p(-h) * compression * step_s / 3600)


def hourly_rate(p: float, step_s: float, compression: float = 1.0) -> float:
    """The inverse of `step_probability`: the hourly rate in percent that a per-step probability stands for."""
    if not 0 <= p < 1:
        raise ConfigError(f"per-step failure probability must be in [0, 1), got {p}")
    if not step_s > 0 or not compression > 0:
        raise ConfigError("step time and compression must be > 0")
    return -math.expm1(math.log1p(-p) * 3600 / (compression * step_s)) * 100


def _check_replicas(replicas: int) -> None:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ConfigError(f"--replicas must be 1..{MAX_REPLICAS}, got {replicas}")


def group_size(stage: int, replicas: int) -> int:
    """Members of stage `stage`'s group: K for every stage (`cfnode demo --replicas K` starts K members of
    stage 0 too: its lead drives, all of them run a share of its microbatches). One function, so that a stage with another size
    changes here only."""
    return replicas


def stage_loss_probability(p: float, members: int) -> float:
    """P(a stage of `members` nodes is lost in one step) = p^members: every member fails in that step, each
    independently with probability p (the paper's footnote on k replicas per stage)."""
    if not 0 <= p <= 1 or members < 1:
        raise ConfigError(f"need 0 <= p <= 1 and members >= 1, got {p}, {members}")
    return p**members


def at_risk_stages(strategy: str, num_stages: int) -> tuple[int, ...]:
    """Stages whose loss the schedule may inject for a strategy, on a swarm of stages 0..L (L = num_stages).

    * checkfree and its rule ablations (uniform-avg, copy, random): the transformer stages 1..L. Stage 0 holds
      the embedding, final norm and head, which plain CheckFree cannot rebuild (as in the paper, where it never
      fails). The edge stages 1 and L are at risk too: cfnode rebuilds them by copying their one transformer
      neighbour (the paper's June runs excluded them instead).
    * checkfree+, checkpoint, redundant: every stage 0..L (CheckFree+ keeps replicas of stage 0 on stages 1 and
      L; a checkpoint or a shadow copy covers any stage).
    * none: the same stages as checkfree. The run draws that schedule and records it but injects nothing, like
      the paper's no_failure run.
    """
    if num_stages < 1:
        raise ConfigError(f"the swarm needs at least one transformer stage, got L={num_stages}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy in ("checkfree+", "checkpoint", "redundant"):
        return tuple(range(num_stages + 1))
    return tuple(range(1, num_stages + 1))


def injects(strategy: str) -> bool:
    """Whether a strategy's run actually kills processes (`none` only records its schedule)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy != "none"


@dataclass(frozen=True, kw_only=True)
class FailureSchedule:
    seed: int
    p: float
    """Per-node, per-step failure probability the events were drawn with."""
    steps: int
    """Length of the run; failures fall in 1..steps-1."""
    num_stages: int
    """L: the swarm has stages 0..L."""
    at_risk: tuple[int, ...]
    min_gap: int = DEFAULT_MIN_GAP
    max_per_step: int = DEFAULT_MAX_PER_STEP
    replicas: int = 1
    """K: members of each stage's group."""
    events: tuple[Failure, ...] = ()
    """In (step, stage, kind) order: once `step` steps have committed, kill `stage`'s whole group (`group`: the
    stage is lost) or one of its members (`member`, one entry per member killed)."""
    suppressed: int = 0
    """Failures the injection rules dropped (a stage loss counts once, each member kill once)."""
    rate: float | None = None
    """Hourly rate in percent p stands for (None: p was given directly)."""
    step_s: float | None = None
    """T used to compute p, if any (metadata)."""
    compression: float | None = None
    """c used to compute p, if any (metadata)."""

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ConfigError(f"schedule p must be in [0, 1], got {self.p}")
        if self.steps < 1:
            raise ConfigError(f"schedule steps must be >= 1, got {self.steps}")
        if self.min_gap < 1 or self.max_per_step < 1:
            raise ConfigError(f"min_gap and max_per_step must be >= 1, got {self.min_gap}, {self.max_per_step}")
        _check_replicas(self.replicas)
        bad = [s for s in self.at_risk if not 0 <= s <= self.num_stages]
        if bad:
            raise ConfigError(f"stages at risk {bad} are outside 0..{self.num_stages}")
        object.__setattr__(self, "events", tuple(Failure(*e) for e in self.events))
        for step, stage, kind in self.events:
            if not 1 <= step < self.steps or stage not in self.at_risk:
                raise ConfigError(f"schedule event (step {step}, stage {stage}) is outside steps 1..{self.steps - 1} "
                                  f"or stages at risk {list(self.at_risk)}")
            if kind not in KINDS:
                raise ConfigError(f"schedule event (step {step}, stage {stage}) has kind {kind!r}; choose from "
                                  f"{', '.join(KINDS)}")
        for (step, stage), kinds in _by_step_and_stage(self.events).items():
            size = group_size(stage, self.replicas)
            if (GROUP in kinds and len(kinds) > 1) or kinds.count(MEMBER) >= size:
                raise ConfigError(f"schedule events at step {step} kill {len(kinds)} x {'/'.join(sorted(set(kinds)))} of "
                                  f"stage {stage}, whose group has {size} member(s): a stage loss is one "
                                  f"'{GROUP}' event, member kills leave at least one member")
        if list(self.events) != sorted(self.events):
            raise ConfigError("schedule events must be sorted by step")

    @property
    def label(self) -> str:
        return level_label(self.rate, self.p)

    @property
    def stage_losses(self) -> tuple[Failure, ...]:
        return tuple(e for e in self.events if e.kind == GROUP)

    @property
    def member_kills(self) -> tuple[Failure, ...]:
        return tuple(e for e in self.events if e.kind == MEMBER)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = SCHEDULE_FORMAT
        out["at_risk"] = list(self.at_risk)
        out["events"] = [{"step": e.step, "stage": e.stage, "kind": e.kind} for e in self.events]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureSchedule:
        if data.get("format", SCHEDULE_FORMAT) not in (1, SCHEDULE_FORMAT):
            raise ConfigError(f"unsupported failure schedule format {data.get('format')!r}")
        try:
            return cls(seed=int(data["seed"]), p=float(data["p"]), steps=int(data["steps"]),
                       num_stages=int(data["num_stages"]), at_risk=tuple(int(s) for s in data["at_risk"]),
                       min_gap=int(data.get("min_gap", DEFAULT_MIN_GAP)),
                       max_per_step=int(data.get("max_per_step", DEFAULT_MAX_PER_STEP)),
                       replicas=int(data.get("replicas", 1)),
                       events=tuple(Failure(int(e["step"]), int(e["stage"]), str(e.get("kind", GROUP)))
                                    for e in data.get("events", ())),
                       suppressed=int(data.get("suppressed", 0)),
                       rate=None if data.get("rate") is None else float(data["rate"]),
                       step_s=None if data.get("step_s") is None else float(data["step_s"]),
                       compression=None if data.get("compression") is None else float(data["compression"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"malformed failure schedule: {e!r}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FailureSchedule:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"failure schedule is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError("failure schedule must be a JSON object")
        return cls.from_dict(data)


def _by_step_and_stage(events: Iterable[Failure]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for e in events:
        out.setdefault((e.step, e.stage), []).append(e.kind)
    return out


def level_label(rate: float | None, p: float) -> str:
    """How a failure level is named in reports: `10%/h`, or `p=0.004` when p was given directly."""
    if rate is not None:
        return f"{rate:g}%/h"
    return f"p={p:g}"


def _rng(seed: int, num_stages: int, member: int = 0) -> random.Random:
    """Member slot `member`'s private stream; slot 0's is the one-node-per-stage stream of format 1."""
    key = f"cfnode-failure-schedule/{seed}/{num_stages}" + (f"/member{member}" if member else "")
    digest = hashlib.sha256(key.encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def member_draws(seed: int, num_stages: int, replicas: int, steps: int) -> Iterator[list[list[float]]]:
    """For each step 1..steps-1: `draws[m][s]`, member slot m's uniform for stage s (m < K, s = 0..L). Slot m's
    numbers depend on the seed, L and m only, not on K: a larger K adds slots and changes none."""
    _check_replicas(replicas)
    streams = [_rng(seed, num_stages, m) for m in range(replicas)]
    for _ in range(1, steps):
        yield [[rng.random() for _ in range(num_stages + 1)] for rng in streams]


class _Hit(NamedTuple):
    rank: int
    """0: a stage loss, 1: member kills (stage losses are injected first)."""
    key: float
    """A stage loss: the largest of its members' draws (the one that completed it); member kills: the smallest."""
    stage: int
    kind: str
    count: int
    """Member kills: how many members of the stage; a stage loss: 1."""


def step_hits(draws: Sequence[Sequence[float]], at_risk: Iterable[int], p: float, replicas: int) -> list[_Hit]:
    """The failures of one step before the injection rules, in the order the rules keep them: every stage at
    risk whose whole group was hit (u < p for each member slot of its group) is a stage loss; one that had
    some but not all of its members hit has that many member kills."""
    out = []
    for stage in at_risk:
        size = group_size(stage, replicas)
        hit = [row[stage] for row in draws[:size] if row[stage] < p]
        if len(hit) == size:
            out.append(_Hit(0, max(hit), stage, GROUP, 1))
        elif hit:
            out.append(_Hit(1, min(hit), stage, MEMBER, len(hit)))
    return sorted(out)


def failures_from_draws(draws: Iterable[Sequence[Sequence[float]]], *, p: float, at_risk: Iterable[int],
                        replicas: int = 1, min_gap: int = DEFAULT_MIN_GAP,
                        max_per_step: int = DEFAULT_MAX_PER_STEP) -> tuple[tuple[Failure, ...], int]:
    """The injection rules (module docstring) over per-step draws (the i-th item is step i + 1's
    `draws[member][stage]`, as `member_draws` yields them; the caller leaves the last step out): the events
    kept and the number of failures suppressed."""
    at_risk = tuple(sorted(set(at_risk)))
    events: list[Failure] = []
    suppressed = 0
    last_step: int | None = None
    for step, step_draws in enumerate(draws, start=1):
        if min(min(row) for row in step_draws) >= p:  # most steps: nobody fails (step_hits says the same)
            continue
        hits = step_hits(step_draws, at_risk, p, replicas)
        if not hits:
            continue
        if last_step is not None and step - last_step < min_gap:
            suppressed += sum(h.count for h in hits)
            continue
        kept = hits[:max_per_step]
        suppressed += sum(h.count for h in hits[max_per_step:])
        events.extend(sorted(Failure(step, h.stage, h.kind) for h in kept for _ in range(h.count)))
        last_step = step
    return tuple(events), suppressed


def generate_schedule(*, seed: int, p: float, steps: int, num_stages: int, at_risk: tuple[int, ...] | list[int],
                      min_gap: int = DEFAULT_MIN_GAP, max_per_step: int = DEFAULT_MAX_PER_STEP, replicas: int = 1,
                      rate: float | None = None, step_s: float | None = None,
                      compression: float | None = None) -> FailureSchedule:
    """Draw the schedule (module docstring): K x (L+1) uniforms per step 1..steps-1, stage losses where every
    member of a group at risk drew u < p, member kills where some did, then the injection rules."""
    at_risk = tuple(sorted(set(at_risk)))
    # Validate the parameters before drawing (the dataclass checks them again with the events).
    FailureSchedule(seed=seed, p=p, steps=steps, num_stages=num_stages, at_risk=at_risk, min_gap=min_gap,
                    max_per_step=max_per_step, replicas=replicas)
    events, suppressed = failures_from_draws(member_draws(seed, num_stages, replicas, steps), p=p, at_risk=at_risk,
                                             replicas=replicas, min_gap=min_gap, max_per_step=max_per_step)
    return FailureSchedule(seed=seed, p=p, steps=steps, num_stages=num_stages, at_risk=at_risk, min_gap=min_gap,
                           max_per_step=max_per_step, replicas=replicas, events=events, suppressed=suppressed,
                           rate=rate, step_s=step_s, compression=compression)


def expected_failures(p: float, steps: int, num_at_risk: int, max_per_step: int | None = None,
                      min_gap: int = 1) -> float:
    """Expected number of injected failures over steps 1..steps-1 with `num_at_risk` stages at risk, one node
    per stage (groups: `expected_group_failures`).

    Per step, K ~ Binomial(n, p) stages hit and min(K, m) are injected (m = `max_per_step`, None: no cap), so
    without the gap rule the expectation is (steps - 1) * E[min(K, m)] (exact; n * p per step without a cap).
    The gap rule blocks the G - 1 steps after each failure step; with q = P(K >= 1) the long-run share of
    failure steps becomes q / (1 + (G - 1) q), so the result is divided by 1 + (G - 1) q (a renewal
    approximation that ignores the ends of the run).
    """
    if not 0 <= p <= 1 or steps < 1 or num_at_risk < 0 or min_gap < 1:
        raise ConfigError(f"need 0 <= p <= 1, steps >= 1, num_at_risk >= 0 and min_gap >= 1; "
                          f"got {p}, {steps}, {num_at_risk}, {min_gap}")
    n = num_at_risk
    if max_per_step is None or max_per_step >= n:
        per_step = n * p
    else:
        per_step = sum(min(k, max_per_step) * math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1))
    q = 1 - (1 - p) ** n
    return (steps - 1) * per_step / (1 + (min_gap - 1) * q)


def expected_group_failures(p: float, steps: int, group_sizes: Sequence[int], max_per_step: int | None = None,
                            min_gap: int = 1) -> tuple[float, float]:
    """(member kills, stage losses) expected over steps 1..steps-1, for stages at risk whose groups have these
    sizes (`group_size` of each).

    Per step a stage of k members is lost with probability a = p^k and has j member kills (1 <= j < k) with
    probability C(k, j) p^j (1 - p)^(k - j). Without a cap: sum of a, and sum of k p (1 - p^(k-1)). With a cap
    m on the stages per step (stage losses first), the joint law of (stage losses G, stages with member kills B)
    is computed exactly; the losses kept are min(G, m), the member-kill stages min(B, m - min(G, m)), each with
    E[j | 1 <= j < k] kills (exact for k <= 2, where j = 1; with larger groups it ignores that the stage with
    the smallest draw tends to have more hits). The gap rule divides both by 1 + (G - 1) q, q = P(any failure in
    a step) = 1 - (1 - p)^(sum of k), as in `expected_failures`, which this equals for groups of one.
    """
    if not 0 <= p <= 1 or steps < 1 or min_gap < 1 or any(k < 1 for k in group_sizes):
        raise ConfigError(f"need 0 <= p <= 1, steps >= 1, min_gap >= 1 and group sizes >= 1; "
                          f"got {p}, {steps}, {min_gap}, {list(group_sizes)}")
    losses = [p**k for k in group_sizes]
    partial = [1 - (1 - p) ** k - p**k for k in group_sizes]  # P(1 <= j < k)
    member_mean = [k * p * (1 - p ** (k - 1)) for k in group_sizes]  # E[j; 1 <= j < k]
    if max_per_step is None or max_per_step >= len(group_sizes):
        per_loss, per_member = sum(losses), sum(member_mean)
    else:
        # joint law of (G, B) over the stages (a small dynamic programme), then the cap
        law: dict[tuple[int, int], float] = {(0, 0): 1.0}
        for a, b in zip(losses, partial, strict=True):
            nxt: dict[tuple[int, int], float] = {}
            for (g, n), pr in law.items():
                for key, w in (((g + 1, n), a), ((g, n + 1), b), ((g, n), 1 - a - b)):
                    nxt[key] = nxt.get(key, 0.0) + pr * w
            law = nxt
        per_loss = sum(pr * min(g, max_per_step) for (g, _), pr in law.items())
        stages_with_kills = sum(pr * min(n, max_per_step - min(g, max_per_step)) for (g, n), pr in law.items())
        hit_stages = sum(partial)
        kills_per_stage = sum(member_mean) / hit_stages if hit_stages > 0 else 0.0
        per_member = stages_with_kills * kills_per_stage
    q = 1 - (1 - p) ** sum(group_sizes)
    scale = (steps - 1) / (1 + (min_gap - 1) * q)
    return per_member * scale, per_loss * scale
