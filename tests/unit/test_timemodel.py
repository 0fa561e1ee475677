"""Table 2's time model (cfnode/experiment/timemodel.py) on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cfnode.experiment.timemodel import (
    StrategyCosts,
    failure_rate_per_s,
    paper_ratios,
    ratios,
    steps_to_target,
    table2,
    wall_time_s,
)

T = 90.0  # s, a step of the paper's 500M model


def test_without_failures_a_run_costs_its_steps_and_its_saves() -> None:
    assert wall_time_s(1000, StrategyCosts(), step_s=T, rate_pct=0, nodes=8) == 90_000.0
    assert wall_time_s(1000, StrategyCosts(step_factor=1.25), step_s=T, rate_pct=0, nodes=8) == 112_500.0
    # 10 saves of 2 steps each
    ckpt = StrategyCosts(save_steps=2.0, checkpoint_every=100)
    assert wall_time_s(1000, ckpt, step_s=T, rate_pct=0, nodes=8) == 91_800.0


def test_a_node_failing_at_h_per_hour_survives_an_hour_with_1_minus_h() -> None:
    lam = failure_rate_per_s(16, 1)
    assert math.exp(-lam * 3600) == pytest.approx(0.84, rel=1e-12)
    assert failure_rate_per_s(16, 8) == pytest.approx(8 * lam)
    assert failure_rate_per_s(0, 8) == 0.0


def test_failures_during_the_repairs_count_too() -> None:
    """CheckFree at 16 %/h, 8 nodes, half a step down per failure: lambda = 8 * 0.174353 / 3600 = 3.87451e-4 /s,
    45 s per failure, W = 90000 / (1 - 0.0174353) = 91597.0 s."""
    w = wall_time_s(1000, StrategyCosts(downtime_steps=0.5), step_s=T, rate_pct=16, nodes=8)
    assert w == pytest.approx(91_597.0, abs=0.5)


def test_a_checkpointing_swarm_redoes_half_an_interval_per_failure() -> None:
    """Every 100 steps, 2-step saves, 1 step to restore: per failure (1 + 50) * 90 = 4590 s; at 10 %/h on 8 nodes
    lambda = 8 * 0.1053605 / 3600 = 2.341345e-4 /s and load 1.0747 > 1: it never finishes; at 5 %/h
    lambda = 1.139851e-4, load 0.5231916, W = 91800 / 0.4768084 = 192530.2 s."""
    ckpt = StrategyCosts(downtime_steps=1.0, save_steps=2.0, checkpoint_every=100)
    assert wall_time_s(1000, ckpt, step_s=T, rate_pct=10, nodes=8) == math.inf
    assert wall_time_s(1000, ckpt, step_s=T, rate_pct=5, nodes=8) == pytest.approx(192_530.2, rel=1e-6)


def test_steps_to_target_interpolates_between_validations() -> None:
    curve = [(0, 8.0), (100, 6.0), (200, 5.0), (300, 4.0)]
    assert steps_to_target(curve, 5.5) == 150.0
    assert steps_to_target(curve, 4.0) == 300.0
    assert steps_to_target(curve, 3.0) is None


def test_table2_in_hours_and_as_ratios_to_checkpointing() -> None:
    steps = {"checkpoint": {0.0: 1000.0}, "checkfree": {0.0: 1100.0}, "random": {0.0: None}}  # no failures
    costs = {"checkpoint": StrategyCosts(save_steps=2.0, checkpoint_every=100),
             "checkfree": StrategyCosts(), "random": StrategyCosts()}
    hours = table2(steps, costs, step_s=T, nodes=8)
    assert hours == {"checkpoint": {0.0: 25.5}, "checkfree": {0.0: 27.5}, "random": {0.0: None}}
    assert ratios(hours) == {"checkpoint": {0.0: 1.0}, "checkfree": {0.0: 27.5 / 25.5}, "random": {0.0: None}}


def test_the_papers_table2_as_ratios() -> None:
    r = paper_ratios()
    assert r["checkpoint"] == {5.0: 1.0, 10.0: 1.0, 16.0: 1.0}
    assert r["checkfree"][16.0] == pytest.approx(563 / 634)
    assert r["checkfree+"][5.0] == pytest.approx(355 / 558)


def test_bad_costs_are_refused() -> None:
    with pytest.raises(ValueError):
        StrategyCosts(step_factor=0)
    with pytest.raises(ValueError):
        failure_rate_per_s(100, 1)
