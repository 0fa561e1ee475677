"""Table 2's time model (docs/experiments.md, "Time model"): how long a strategy needs to reach a target
validation loss at an hourly failure rate, from the steps it needs (a loss curve of the local engine, which
trains every rule's math exactly as the swarm does) and what it costs per step, per failure and per
checkpoint (measured on a real swarm, in units of plain CheckFree's step time).

The paper (arXiv 2506.15461, Table 2) models its checkpoint baseline offline the same way; its convergence runs
inject failures per iteration. Here the failures that cost time arrive per second of wall time, on every node,
also while the swarm is down or redoing lost steps, so the wall time W solves

    W = work + lambda * W * per_failure        lambda = nodes * -ln(1 - h) / 3600   (h = rate_pct / 100)

work = (steps * step_factor + saves * save_steps) * T and per_failure = (downtime_steps + lost_steps) * T, with
T the modelled step time (the paper's 500M model: ~90 s a step). A checkpointing swarm loses, on average, half
an interval of committed steps per failure (failures arrive uniformly in time) and redoes them at its step time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cfnode.experiment.report import time_to_target

PAPER_TABLE2_H: dict[str, tuple[float, float, float]] = {
    "checkpoint": (558.0, 622.0, 634.0),
    "redundant": (420.0, 420.0, 420.0),
    "checkfree": (368.0, 406.0, 563.0),
    "checkfree+": (355.0, 368.0, 461.0),
}
"""Hours to validation loss 2.85 on the paper's 500M model at 5, 10 and 16 %/h (v2, Table 2; redundant
computation is given once: its time does not depend on the rate)."""
PAPER_RATES_PCT = (5.0, 10.0, 16.0)


@dataclass(frozen=True)
class StrategyCosts:
    """What one strategy costs beyond its steps, measured on a real swarm, in units of the base step time (plain
    CheckFree's): 1.0 is one step."""

    step_factor: float = 1.0
    """Its step time over the base (redundant computation's extra forward, CheckFree+'s replica pushes)."""
    downtime_steps: float = 0.0
    """Per failure: from the kill to the first committed step after it (detection, rebuild or restore)."""
    save_steps: float = 0.0
    """Checkpointing: one save of every stage."""
    checkpoint_every: int = 0
    """Checkpointing: committed steps between saves (0: no checkpoints)."""

    def __post_init__(self) -> None:
        if not self.step_factor > 0 or self.downtime_steps < 0 or self.save_steps < 0 or self.checkpoint_every < 0:
            raise ValueError(f"costs must be non-negative and the step factor positive: {self}")

    @property
    def lost_steps(self) -> float:
        """Committed steps a failure undoes, on average: half a checkpoint interval (none without checkpoints)."""
        return self.checkpoint_every / 2


def failure_rate_per_s(rate_pct: float, nodes: int) -> float:
    """Failures per second of a swarm of `nodes` nodes, each failing at `rate_pct` %/h (a Poisson rate, so
    that one node survives an hour with probability 1 - rate_pct / 100)."""
    if not 0 <= rate_pct < 100 or nodes < 0:
        raise ValueError(f"rate must be in [0, 100) %/h and nodes >= 0, got {rate_pct}, {nodes}")
    return nodes * -math.log1p(-rate_pct / 100) / 3600


def wall_time_s(steps: float, costs: StrategyCosts, *, step_s: float, rate_pct: float, nodes: int) -> float:
    """Wall seconds to commit `steps` steps at step time `step_s` with `nodes` nodes failing at `rate_pct` %/h;
    inf if failures come faster than the swarm repairs them (it never gets there)."""
    saves = steps / costs.checkpoint_every if costs.checkpoint_every else 0.0
    work = (steps * costs.step_factor + saves * costs.save_steps) * step_s
    per_failure = (costs.downtime_steps + costs.lost_steps * costs.step_factor) * step_s
    load = failure_rate_per_s(rate_pct, nodes) * per_failure
    return work / (1 - load) if load < 1 else math.inf


def steps_to_target(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """Steps a (step, validation loss) curve needs to reach `target`, interpolated between validations; None if
    it never does."""
    return time_to_target([(float(s), v) for s, v in curve], target)


def table2(steps: Mapping[str, Mapping[float, float | None]], costs: Mapping[str, StrategyCosts], *,
           step_s: float, nodes: int) -> dict[str, dict[float, float | None]]:
    """Hours to the target per strategy and rate: `steps[strategy][rate]` is what its loss curve at that rate
    needs (None: not reached), `costs[strategy]` what it pays."""
    return {name: {rate: (None if n is None else wall_time_s(n, costs[name], step_s=step_s, rate_pct=rate,
                                                              nodes=nodes) / 3600)
                   for rate, n in by_rate.items()}
            for name, by_rate in steps.items()}


def ratios(hours: Mapping[str, Mapping[float, float | None]], reference: str = "checkpoint"
           ) -> dict[str, dict[float, float | None]]:
    """Each strategy's time over the reference's at the same rate (what compares with the paper's Table 2)."""
    out: dict[str, dict[float, float | None]] = {}
    for name, by_rate in hours.items():
        out[name] = {}
        for rate, h in by_rate.items():
            ref = hours.get(reference, {}).get(rate)
            out[name][rate] = None if h is None or ref is None or not math.isfinite(ref) else h / ref
    return out


def paper_ratios(reference: str = "checkpoint") -> dict[str, dict[float, float]]:
    """The paper's Table 2 as ratios to its checkpointing baseline."""
    ref = PAPER_TABLE2_H[reference]
    return {name: {rate: h / r for rate, h, r in zip(PAPER_RATES_PCT, hs, ref, strict=True)}
            for name, hs in PAPER_TABLE2_H.items()}
