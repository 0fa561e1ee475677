"""Table 2 from measured costs (cfnode/experiment/table2.py), on hand-computed swarm runs and curves."""

from __future__ import annotations

import pytest

from cfnode.experiment import table2
from cfnode.experiment.report import RunRecord
from cfnode.experiment.timemodel import StrategyCosts, wall_time_s


def timed(strategy: str, step_s: list[float], kill_at: float | None = None, back_at: float | None = None,
          val: dict[int, float] | None = None) -> RunRecord:
    """Steps 1..n committed at the cumulative sum of their step times; a kill at `kill_at` s rebuilt at `back_at`
    (the next step to commit after it ends the downtime)."""
    steps, t = [], 0.0
    for i, s in enumerate(step_s, start=1):
        t += s
        steps.append({"step": i, "time_s": t, "loss": 1.0, "val_loss": (val or {}).get(i), "step_s": s})
    events = []
    if kill_at is not None:
        events = [{"kind": "failure", "stage": 2, "step": 0, "time_s": kill_at, "loss": "stage"},
                  {"kind": "recovery", "stage": 2, "step": 0, "time_s": back_at}]
    return RunRecord(strategy=strategy, steps=steps, events=events)


def test_measured_takes_medians_the_save_steps_apart_and_the_downtime_from_the_kill() -> None:
    base = timed("checkfree", [9.0, 1.0, 1.0, 1.0, 1.0], kill_at=9.5, back_at=10.5)  # first step left out
    # checkpointing every 2 steps: steps 2 and 4 save (2.0 s), the others take 1.2 s
    ckpt = timed("checkpoint", [9.0, 2.0, 1.2, 2.0, 1.2])
    m = table2.measured([base, ckpt], checkpoint_every=2)
    assert m["base_step_s"] == 1.0
    cf, cp = m["strategies"]["checkfree"], m["strategies"]["checkpoint"]
    assert cf["downtime_s"] == pytest.approx(11.0 - 9.5)  # steps commit at 9, 10, 11...: 11 is the first after 10.5
    assert cp["step_factor"] == pytest.approx(1.2) and cp["save_extra_s"] == pytest.approx(0.8)
    assert cp["failures"] == 0 and cp["downtime_s"] is None


def test_model_costs_keep_the_fixed_downtime_in_seconds_and_the_rest_as_ratios() -> None:
    m = {"base_step_s": 2.0, "strategies": {
        "checkfree": {"step_factor": 1.0, "downtime_s": 11.0},
        "redundant": {"step_factor": 1.5, "downtime_s": 12.0},
        "checkpoint": {"step_factor": 1.1, "downtime_s": 20.2, "save_extra_s": 0.5}}}
    costs = table2.model_costs(m, model_step_s=90.0, intervals=(10, 50))
    assert costs["checkfree"].downtime_steps == pytest.approx((11.0 - 2.0) / 90 + 1.0)
    red = costs["redundant"]
    assert (red.step_factor, red.save_steps, red.checkpoint_every) == (1.5, 0.0, 0)
    assert red.downtime_steps == pytest.approx((12.0 - 3.0) / 90 + 1.5)  # its retried step is a slower one
    c50 = costs["checkpoint/50"]
    assert (c50.checkpoint_every, c50.save_steps, c50.lost_steps) == (50, pytest.approx(0.25), 25)
    assert c50.downtime_steps == pytest.approx((20.2 - 2.2) / 90 + 1.1)
    assert set(costs) == {"checkfree", "redundant", "checkpoint/10", "checkpoint/50"}


def test_steps_needed_uses_each_rules_curve_and_the_failure_free_one_for_the_exact_baselines() -> None:
    free = timed("none", [1.0] * 40, val={10: 6.0, 20: 5.0, 30: 4.0, 40: 3.5})
    cf = {rate: [timed("checkfree", [1.0] * 40, val={10: 6.0, 20: 5.0, 40: 4.0})] for rate in (5.0, 10.0)}
    cf[16.0] = [timed("checkfree", [1.0] * 40, val={10: 6.0, 40: 4.5})]  # never reaches 4.0
    steps = table2.steps_needed({"checkfree": cf}, [free], 4.0, ["checkfree", "checkpoint/50", "redundant"])
    assert steps["checkpoint/50"] == steps["redundant"] == {5.0: 30.0, 10.0: 30.0, 16.0: 30.0}
    other_seed = timed("none", [1.0] * 40, val={10: 6.0, 20: 4.0})  # reaches 4.0 at step 20
    both = table2.steps_needed({}, [free, other_seed], 4.0, ["redundant"])
    assert both["redundant"] == {5.0: 25.0, 10.0: 25.0, 16.0: 25.0}  # the mean over the seeds
    assert steps["checkfree"] == {5.0: 40.0, 10.0: 40.0, 16.0: None}


def test_build_puts_hours_and_ratios_beside_the_papers() -> None:
    free = timed("none", [1.0] * 40, val={10: 6.0, 20: 5.0, 30: 4.0, 40: 3.9})
    curves = {name: {rate: [timed(name, [1.0] * 40, val={10: 6.0, 20: 5.0, 40: 3.9})] for rate in (5.0, 10.0, 16.0)}
              for name in ("checkfree", "checkfree+")}
    swarm = [timed(name, steps, kill_at=2.5, back_at=3.5) for name, steps in (
        ("checkfree", [1.0] * 6), ("checkfree+", [1.0] * 6), ("checkpoint", [1.0, 2.0, 1.0, 2.0, 1.0, 1.0]),
        ("redundant", [2.0] * 6))]
    t = table2.build(curves, [free], swarm, swarm_checkpoint_every=2, model_step_s=90.0, nodes=5, target=4.0)
    assert t["ratios"]["checkpoint/50"] == {5.0: 1.0, 10.0: 1.0, 16.0: 1.0}
    cf = t["costs"]["checkfree"]
    expected = wall_time_s(t["steps"]["checkfree"][16.0], StrategyCosts(**{k: cf[k] for k in (
        "step_factor", "downtime_steps", "save_steps", "checkpoint_every")}), step_s=90.0, rate_pct=16.0,
        nodes=5) / 3600
    assert t["hours"]["checkfree"][16.0] == pytest.approx(expected)
    assert t["paper_ratios"]["checkfree"][16.0] == pytest.approx(563 / 634)
    text = table2.markdown(t)
    assert "| checkpoint/50 |" in text and "0.89" in text  # the paper's CheckFree at 16 %/h: 563 / 634
