"""Seeded failure schedules for `cfnode experiment`: which stage's process is killed after which step.

Pure functions, no I/O. The method is described in docs/experiments.md; in short:

* A stage fails in a step with probability p = 1 - (1 - h)^(c * T / 3600) (h: hourly failure rate,
  T: seconds per step, c: time-compression factor), independently per stage at risk and per step.
* Every (step, stage) pair of stages 0..L gets one uniform number u from a private `random.Random` seeded
  from the experiment seed alone, whatever the strategy, rate or length of the run; stage s fails at step t
  when s is at risk and u < p. Strategies with the same stages at risk therefore get the same schedule, runs
  of different rates share their draws (a higher rate fails wherever a lower one does, before the injection
  rules), and a longer run extends a shorter one.
* Injection rules, applied in step order: never at step 0 (nothing trained yet) or at the last step (training
  is over); at most `max_per_step` failures per step (default 1: the swarm rebuilds one stage per spare; when
  more stages hit, the smallest u wins); at least `min_gap` committed steps between two failure steps (training
  pauses while a stage is missing, so these steps all run after the rebuild). Hits the rules drop are counted
  in `suppressed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from cfnode.errors import ConfigError

STRATEGIES = ("none", "checkfree", "checkfree+", "uniform-avg", "copy", "random", "checkpoint", "redundant")
"""Every strategy `cfnode experiment` knows (runner.py says which ones it can run today)."""

DEFAULT_MIN_GAP = 10
DEFAULT_MAX_PER_STEP = 1
SCHEDULE_FORMAT = 1


def step_probability(rate_pct: float, step_s: float, compression: float = 1.0) -> float:
    """Per-stage, per-step failure probability p = 1 - (1 - h)^(c * T / 3600), h = rate_pct / 100.

    `rate_pct` is the hourly failure rate of one stage in percent (5 means 5 %/h), `step_s` the seconds one
    training step takes (T), `compression` how many seconds of modelled time one real second stands for (c).
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
    """Per-stage, per-step failure probability the events were drawn with."""
    steps: int
    """Length of the run; failures fall in 1..steps-1."""
    num_stages: int
    """L: the swarm has stages 0..L."""
    at_risk: tuple[int, ...]
    min_gap: int = DEFAULT_MIN_GAP
    max_per_step: int = DEFAULT_MAX_PER_STEP
    events: tuple[tuple[int, int], ...] = ()
    """(step, stage), in step order: kill the process holding `stage` once `step` steps have committed."""
    suppressed: int = 0
    """Hits the injection rules dropped (second failure in a step, or too soon after the previous one)."""
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
        bad = [s for s in self.at_risk if not 0 <= s <= self.num_stages]
        if bad:
            raise ConfigError(f"stages at risk {bad} are outside 0..{self.num_stages}")
        for step, stage in self.events:
            if not 1 <= step < self.steps or stage not in self.at_risk:
                raise ConfigError(f"schedule event (step {step}, stage {stage}) is outside steps 1..{self.steps - 1} "
                                  f"or stages at risk {list(self.at_risk)}")
        if list(self.events) != sorted(self.events):
            raise ConfigError("schedule events must be sorted by step")

    @property
    def label(self) -> str:
        return level_label(self.rate, self.p)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = SCHEDULE_FORMAT
        out["at_risk"] = list(self.at_risk)
        out["events"] = [{"step": step, "stage": stage} for step, stage in self.events]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureSchedule:
        if data.get("format", SCHEDULE_FORMAT) != SCHEDULE_FORMAT:
            raise ConfigError(f"unsupported failure schedule format {data.get('format')!r}")
        try:
            return cls(seed=int(data["seed"]), p=float(data["p"]), steps=int(data["steps"]),
                       num_stages=int(data["num_stages"]), at_risk=tuple(int(s) for s in data["at_risk"]),
                       min_gap=int(data.get("min_gap", DEFAULT_MIN_GAP)),
                       max_per_step=int(data.get("max_per_step", DEFAULT_MAX_PER_STEP)),
                       events=tuple((int(e["step"]), int(e["stage"])) for e in data.get("events", ())),
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


def level_label(rate: float | None, p: float) -> str:
    """How a failure level is named in reports: `10%/h`, or `p=0.004` when p was given directly."""
    if rate is not None:
        return f"{rate:g}%/h"
    return f"p={p:g}"


def _rng(seed: int, num_stages: int) -> random.Random:
    digest = hashlib.sha256(f"cfnode-failure-schedule/{seed}/{num_stages}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def generate_schedule(*, seed: int, p: float, steps: int, num_stages: int, at_risk: tuple[int, ...] | list[int],
                      min_gap: int = DEFAULT_MIN_GAP, max_per_step: int = DEFAULT_MAX_PER_STEP,
                      rate: float | None = None, step_s: float | None = None,
                      compression: float | None = None) -> FailureSchedule:
    """Draw the schedule (module docstring): L+1 uniforms per step 1..steps-1, hits where u < p on a stage at
    risk, then the injection rules."""
    at_risk = tuple(sorted(set(at_risk)))
    # Validate the parameters before drawing (the dataclass checks them again with the events).
    FailureSchedule(seed=seed, p=p, steps=steps, num_stages=num_stages, at_risk=at_risk, min_gap=min_gap,
                    max_per_step=max_per_step)
    rng = _rng(seed, num_stages)
    events: list[tuple[int, int]] = []
    suppressed = 0
    last_step: int | None = None
    for step in range(1, steps):
        draws = [rng.random() for _ in range(num_stages + 1)]
        hits = sorted((draws[s], s) for s in at_risk if draws[s] < p)
        if not hits:
            continue
        if last_step is not None and step - last_step < min_gap:
            suppressed += len(hits)
            continue
        kept = hits[:max_per_step]
        suppressed += len(hits) - len(kept)
        events.extend(sorted((step, stage) for _, stage in kept))
        last_step = step
    return FailureSchedule(seed=seed, p=p, steps=steps, num_stages=num_stages, at_risk=at_risk, min_gap=min_gap,
                           max_per_step=max_per_step, events=tuple(events), suppressed=suppressed, rate=rate,
                           step_s=step_s, compression=compression)


def expected_failures(p: float, steps: int, num_at_risk: int, max_per_step: int | None = None,
                      min_gap: int = 1) -> float:
    """Expected number of injected failures over steps 1..steps-1 with `num_at_risk` stages at risk.

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
