"""The experiment's failure schedules: the probability formula, determinism, the rate, the injection rules,
the same schedule for every strategy, and the JSON round trip."""

from __future__ import annotations

import itertools
import math

import pytest

from cfnode.errors import ConfigError
from cfnode.experiment.schedule import (
    STRATEGIES,
    FailureSchedule,
    at_risk_stages,
    expected_failures,
    generate_schedule,
    hourly_rate,
    injects,
    level_label,
    step_probability,
)

L = 4
CHECKFREE_LIKE = ("none", "checkfree", "uniform-avg", "copy", "random")


def _gen(**kw) -> FailureSchedule:
    args = {"seed": 7, "p": 0.01, "steps": 2000, "num_stages": L, "at_risk": (1, 2, 3, 4)} | kw
    return generate_schedule(**args)


# -- probability -----------------------------------------------------------------------------------------------


def test_probability_formula() -> None:
    # one hour per step: p is the hourly rate itself
    assert step_probability(10, 3600) == pytest.approx(0.10, abs=1e-12)
    # 90 s: 1 - 0.9^(90/3600) = 1 - exp(0.025 * ln 0.9) = 0.0026305...
    assert step_probability(10, 90) == pytest.approx(1 - 0.9 ** 0.025, rel=1e-12)
    assert step_probability(10, 90) == pytest.approx(0.0026305469, rel=1e-8)
    # the paper's 500M table (0.0009 / 0.002 / 0.004 at 5 / 10 / 16 %) implies T of ~63-90 s
    assert step_probability(16, 90) == pytest.approx(0.0043493, rel=1e-4)
    assert step_probability(0, 90) == 0.0
    assert step_probability(100, 1) == 1.0


def test_compression_multiplies_the_step_time() -> None:
    assert step_probability(5, 0.9, 100) == pytest.approx(step_probability(5, 90, 1), rel=1e-12)
    assert step_probability(5, 2, 45) == pytest.approx(step_probability(5, 90), rel=1e-12)


def test_hourly_rate_inverts_the_formula() -> None:
    for rate in (5, 10, 16, 33):
        assert hourly_rate(step_probability(rate, 1.5, 60), 1.5, 60) == pytest.approx(rate, rel=1e-9)


@pytest.mark.parametrize("args", [(-1, 1, 1), (101, 1, 1), (10, 0, 1), (10, 1, 0), (10, math.inf, 1)])
def test_probability_rejects_bad_inputs(args) -> None:
    with pytest.raises(ConfigError):
        step_probability(*args)


# -- determinism and sharing -----------------------------------------------------------------------------------


def test_same_parameters_same_schedule() -> None:
    a, b = _gen(), _gen()
    assert a == b
    assert a.events, "p=0.01 over 2000 steps must fail somewhere"


def test_other_seed_other_schedule() -> None:
    assert _gen(seed=7).events != _gen(seed=8).events


def test_the_global_random_state_does_not_matter() -> None:
    import random

    random.seed(1)
    a = _gen()
    random.seed(2)
    random.random()
    assert _gen() == a


def test_every_checkfree_like_strategy_gets_the_same_schedule() -> None:
    scheds = {s: _gen(at_risk=at_risk_stages(s, L)) for s in CHECKFREE_LIKE}
    first = scheds["checkfree"]
    assert all(s.events == first.events for s in scheds.values())


def test_checkfree_plus_shares_the_draws_of_checkfree() -> None:
    # without the injection rules, CheckFree+ fails exactly where CheckFree does, plus stage 0's hits
    rules_off = {"min_gap": 1, "max_per_step": L + 1}
    plain = _gen(at_risk=at_risk_stages("checkfree", L), **rules_off)
    plus = _gen(at_risk=at_risk_stages("checkfree+", L), **rules_off)
    assert [e for e in plus.events if e[1] != 0] == list(plain.events)
    assert any(stage == 0 for _, stage in plus.events)


def test_a_longer_run_extends_a_shorter_one() -> None:
    short, long = _gen(steps=500), _gen(steps=2000)
    assert list(short.events) == [e for e in long.events if e[0] < 500]


def test_a_higher_rate_fails_wherever_a_lower_one_does() -> None:
    rules_off = {"min_gap": 1, "max_per_step": L}
    low, high = _gen(p=0.002, **rules_off), _gen(p=0.01, **rules_off)
    assert set(low.events) <= set(high.events)
    assert len(high.events) > len(low.events)


# -- rate -----------------------------------------------------------------------------------------------------


def test_rate_matches_p_without_rules() -> None:
    # 3 stages x 100000 steps x p=0.02: 6000 expected, sd ~77
    s = generate_schedule(seed=1, p=0.02, steps=100_001, num_stages=3, at_risk=(1, 2, 3), min_gap=1,
                          max_per_step=3)
    assert expected_failures(0.02, 100_001, 3) == pytest.approx(6000)
    assert len(s.events) == pytest.approx(6000, rel=0.04)
    per_stage = [sum(1 for _, st in s.events if st == k) for k in (1, 2, 3)]
    assert all(n == pytest.approx(2000, rel=0.08) for n in per_stage)
    assert s.suppressed == 0


def test_rate_with_the_default_rules_matches_the_helper() -> None:
    s = generate_schedule(seed=3, p=0.01, steps=100_001, num_stages=4, at_risk=(1, 2, 3, 4))
    expected = expected_failures(0.01, 100_001, 4, max_per_step=1, min_gap=10)
    assert len(s.events) == pytest.approx(expected, rel=0.05)


def test_expected_failures_by_hand() -> None:
    # 100 eligible steps, 4 stages, p = 0.01
    assert expected_failures(0.01, 101, 4) == pytest.approx(4.0)
    # at most one per step: 100 * (1 - 0.99^4) = 100 * 0.03940399
    assert expected_failures(0.01, 101, 4, max_per_step=1) == pytest.approx(3.940399)
    # gap 10: divided by 1 + 9 * 0.03940399 = 1.35463591
    assert expected_failures(0.01, 101, 4, max_per_step=1, min_gap=10) == pytest.approx(3.940399 / 1.35463591)
    assert expected_failures(0.0, 101, 4) == 0.0
    with pytest.raises(ConfigError):
        expected_failures(1.5, 10, 4)


# -- injection rules ------------------------------------------------------------------------------------------


def test_never_at_step_0_nor_at_the_last_step() -> None:
    s = generate_schedule(seed=0, p=1.0, steps=20, num_stages=2, at_risk=(1, 2), min_gap=1)
    steps = [step for step, _ in s.events]
    assert steps == list(range(1, 20))


def test_one_failure_per_step_by_default_and_the_smallest_draw_wins() -> None:
    s = generate_schedule(seed=0, p=1.0, steps=50, num_stages=3, at_risk=(1, 2, 3), min_gap=1)
    assert len({step for step, _ in s.events}) == len(s.events) == 49
    assert s.suppressed == 2 * 49  # three hits per step, one kept
    assert len({stage for _, stage in s.events}) == 3  # not always the same stage


def test_max_per_step() -> None:
    s = generate_schedule(seed=0, p=1.0, steps=10, num_stages=3, at_risk=(1, 2, 3), min_gap=1, max_per_step=2)
    assert len(s.events) == 18
    assert all(sum(1 for st, _ in s.events if st == step) == 2 for step in range(1, 10))


def test_min_gap_between_failures() -> None:
    s = _gen(p=0.05, min_gap=25)
    steps = [step for step, _ in s.events]
    assert len(steps) > 10
    assert all(b - a >= 25 for a, b in itertools.pairwise(steps))
    assert s.suppressed > 0


def test_only_stages_at_risk_fail() -> None:
    s = _gen(p=0.05, at_risk=(2,), min_gap=1)
    assert s.events and {stage for _, stage in s.events} == {2}


# -- strategies -----------------------------------------------------------------------------------------------


def test_stages_at_risk_per_strategy() -> None:
    assert at_risk_stages("checkfree", 4) == (1, 2, 3, 4)
    for s in CHECKFREE_LIKE:
        assert at_risk_stages(s, 4) == (1, 2, 3, 4)
    for s in ("checkfree+", "checkpoint", "redundant"):
        assert at_risk_stages(s, 4) == (0, 1, 2, 3, 4)
    assert set(STRATEGIES) == {*CHECKFREE_LIKE, "checkfree+", "checkpoint", "redundant"}
    with pytest.raises(ConfigError, match="unknown strategy"):
        at_risk_stages("bogus", 4)


def test_none_records_but_does_not_inject() -> None:
    assert not injects("none")
    assert all(injects(s) for s in STRATEGIES if s != "none")


# -- JSON -----------------------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    s = generate_schedule(seed=5, p=step_probability(10, 90), steps=3000, num_stages=4, at_risk=(0, 1, 2, 3, 4),
                          rate=10.0, step_s=0.9, compression=100.0)
    back = FailureSchedule.from_json(s.to_json())
    assert back == s
    assert back.label == "10%/h"
    assert FailureSchedule.from_dict(s.to_dict()) == s


def test_hand_written_schedule_and_bad_files() -> None:
    s = FailureSchedule.from_json('{"seed": 0, "p": 0.0, "steps": 15, "num_stages": 3, "at_risk": [1, 2, 3], '
                                  '"events": [{"step": 6, "stage": 2}]}')
    assert s.events == ((6, 2),) and s.label == "p=0"
    with pytest.raises(ConfigError, match="outside"):
        FailureSchedule.from_json('{"seed": 0, "p": 0.1, "steps": 15, "num_stages": 3, "at_risk": [1, 2, 3], '
                                  '"events": [{"step": 6, "stage": 0}]}')
    with pytest.raises(ConfigError, match="outside"):
        FailureSchedule.from_json('{"seed": 0, "p": 0.1, "steps": 15, "num_stages": 3, "at_risk": [1, 2, 3], '
                                  '"events": [{"step": 15, "stage": 1}]}')
    with pytest.raises(ConfigError, match="not JSON"):
        FailureSchedule.from_json("{")
    with pytest.raises(ConfigError, match="malformed"):
        FailureSchedule.from_json('{"seed": 0}')


def test_level_labels() -> None:
    assert level_label(10.0, 0.0026) == "10%/h"
    assert level_label(None, 0.004) == "p=0.004"
