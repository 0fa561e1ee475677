"""The experiment's failure schedules: the probability formula, determinism, the rate, the injection rules,
the same schedule for every strategy, stage groups (member kills vs stage losses, p^K), and the JSON round
trip."""

from __future__ import annotations

import hashlib
import itertools
import math
import random

import pytest

from cfnode.errors import ConfigError
from cfnode.experiment.schedule import (
    GROUP,
    MEMBER,
    STRATEGIES,
    Failure,
    FailureSchedule,
    at_risk_stages,
    expected_failures,
    expected_group_failures,
    failures_from_draws,
    generate_schedule,
    hourly_rate,
    injects,
    level_label,
    member_draws,
    stage_loss_probability,
    step_hits,
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
    assert [e for e in plus.events if e.stage != 0] == list(plain.events)
    assert any(e.stage == 0 for e in plus.events)


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
    per_stage = [sum(1 for e in s.events if e.stage == k) for k in (1, 2, 3)]
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
    steps = [e.step for e in s.events]
    assert steps == list(range(1, 20))


def test_one_failure_per_step_by_default_and_the_smallest_draw_wins() -> None:
    s = generate_schedule(seed=0, p=1.0, steps=50, num_stages=3, at_risk=(1, 2, 3), min_gap=1)
    assert len({e.step for e in s.events}) == len(s.events) == 49
    assert s.suppressed == 2 * 49  # three hits per step, one kept
    assert len({e.stage for e in s.events}) == 3  # not always the same stage


def test_max_per_step() -> None:
    s = generate_schedule(seed=0, p=1.0, steps=10, num_stages=3, at_risk=(1, 2, 3), min_gap=1, max_per_step=2)
    assert len(s.events) == 18
    assert all(sum(1 for e in s.events if e.step == step) == 2 for step in range(1, 10))


def test_min_gap_between_failures() -> None:
    s = _gen(p=0.05, min_gap=25)
    steps = [e.step for e in s.events]
    assert len(steps) > 10
    assert all(b - a >= 25 for a, b in itertools.pairwise(steps))
    assert s.suppressed > 0


def test_only_stages_at_risk_fail() -> None:
    s = _gen(p=0.05, at_risk=(2,), min_gap=1)
    assert s.events and {e.stage for e in s.events} == {2}


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
    assert s.events == ((6, 2, "group"),) and s.label == "p=0"  # format 1: no kind, a stage loss
    assert s.events[0] == Failure(6, 2) and s.replicas == 1
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


# -- stage groups: K members per transformer stage -------------------------------------------------------------

G, M = GROUP, MEMBER


def test_one_node_per_stage_is_the_schedule_from_before_groups() -> None:
    # the schedule of docs/experiments.md's results (seed 1, 300 s per step at 16 %/h, gap 8): 2@8, 3@24, 2@41,
    # 4@54, drawn before stage groups existed; K = 1 (the default) must keep drawing exactly it
    for kw in ({}, {"replicas": 1}):
        s = generate_schedule(seed=1, p=0.0144, steps=60, num_stages=4, at_risk=(1, 2, 3, 4), min_gap=8, **kw)
        assert [(e.step, e.stage) for e in s.events] == [(8, 2), (24, 3), (41, 2), (54, 4)]
        assert {e.kind for e in s.events} == {G} and s.suppressed == 1 and s.replicas == 1
    s = generate_schedule(seed=0, p=0.02, steps=200, num_stages=3, at_risk=(1, 2, 3), min_gap=10)
    assert [(e.step, e.stage) for e in s.events] == [(6, 3), (33, 2), (63, 1), (83, 2), (100, 3), (157, 2),
                                                     (171, 3)]
    assert s.suppressed == 6


def test_member_slot_0_is_the_one_node_stream_and_slots_do_not_depend_on_k() -> None:
    # the stream of the schedules before groups: sha256 of "cfnode-failure-schedule/SEED/L", L+1 draws a step
    digest = hashlib.sha256(b"cfnode-failure-schedule/5/4").digest()
    old = random.Random(int.from_bytes(digest[:8], "big"))
    two, three = list(member_draws(5, 4, 2, 30)), list(member_draws(5, 4, 3, 30))
    assert len(two) == 29 and all(len(step) == 2 and len(step[0]) == 5 for step in two)
    assert [step[0] for step in two] == [[old.random() for _ in range(5)] for _ in range(29)]
    assert [step[:2] for step in three] == two  # a third slot adds draws, changes none
    assert two[0][0] != two[0][1]  # the slots are distinct streams


def _draws(*steps: tuple[list[float], ...]) -> list[tuple[list[float], ...]]:
    """Hand-written draws: one tuple per step 1, 2, ... of per-member lists of stage 0..L uniforms."""
    return list(steps)


HAND = _draws(  # L = 2, p = 0.1; members m0, m1; stage 0 is never at risk here
    ([.9, .05, .9], [.9, .9, .9]),   # 1: stage 1 one member hit
    ([.9, .01, .02], [.9, .03, .9]),  # 2: stage 1 both hit (a loss), stage 2 one member
    ([.9, .09, .02], [.9, .08, .01]),  # 3: both stages lost: keys .09 (stage 1) and .02 (stage 2)
    ([.01, .9, .9], [.01, .9, .9]),   # 4: only stage 0, not at risk
    ([.9, .5, .05], [.9, .04, .5]),   # 5: one member of each: keys .04 (stage 1) and .05 (stage 2)
    ([.9, .9, .9], [.9, .9, .9]),     # 6: nothing
    ([.9, .01, .09], [.9, .9, .05]),  # 7: stage 1 one member (key .01), stage 2 lost (key .09)
)


def test_two_members_hand_computed() -> None:
    assert step_hits(HAND[1], (1, 2), 0.1, 2) == [(0, .03, 1, G, 1), (1, .02, 2, M, 1)]
    assert step_hits(HAND[3], (1, 2), 0.1, 2) == []
    # gap 2, one stage per step: step 2 is too soon after 1 (2 suppressed: the loss and the member); at 3 the
    # loss with the smaller key (stage 2, .02) wins; at 5 the member with the smaller draw (stage 1, .04); at 7
    # the stage loss goes first although its key (.09) is larger than the member's (.01)
    events, suppressed = failures_from_draws(HAND, p=0.1, at_risk=(1, 2), replicas=2, min_gap=2, max_per_step=1)
    assert events == ((1, 1, M), (3, 2, G), (5, 1, M), (7, 2, G))
    assert suppressed == 2 + 1 + 1 + 1
    # without the rules every hit is injected: a loss is one event, a member kill one per member
    events, suppressed = failures_from_draws(HAND, p=0.1, at_risk=(1, 2), replicas=2, min_gap=1, max_per_step=2)
    assert events == ((1, 1, M), (2, 1, G), (2, 2, M), (3, 1, G), (3, 2, G), (5, 1, M), (5, 2, M), (7, 1, M),
                      (7, 2, G))
    assert suppressed == 0


def test_the_same_draws_with_one_node_per_stage() -> None:
    # K = 1 reads member slot 0 only, and every hit loses the stage: at 3, stage 2 (.02) beats stage 1 (.09)
    events, suppressed = failures_from_draws(HAND, p=0.1, at_risk=(1, 2), replicas=1, min_gap=2, max_per_step=1)
    assert events == ((1, 1, G), (3, 2, G), (5, 2, G), (7, 1, G))
    assert suppressed == 2 + 1 + 1


def test_several_members_of_one_stage() -> None:
    # K = 3, stages 0 and 1 at risk (stage 0's group has K members too); stage 0: all three hit, a loss with key
    # .07 (the largest draw); stage 1: two of its three members hit, two member kills, it carries on with one
    step = ([.05, .05], [.02, .05], [.07, .9])
    assert step_hits(step, (0, 1), 0.1, 3) == [(0, .07, 0, G, 1), (1, .05, 1, M, 2)]
    events, suppressed = failures_from_draws([step], p=0.1, at_risk=(0, 1), replicas=3, max_per_step=1)
    assert events == ((1, 0, G),) and suppressed == 2
    events, suppressed = failures_from_draws([step], p=0.1, at_risk=(0, 1), replicas=3, max_per_step=2)
    assert events == ((1, 0, G), (1, 1, M), (1, 1, M)) and suppressed == 0
    one_short = ([.05, .05], [.02, .05], [.5, .05])  # stage 0: two of three members, stage 1: all three
    events, _ = failures_from_draws([one_short], p=0.1, at_risk=(0, 1), replicas=3, max_per_step=2)
    assert events == ((1, 0, M), (1, 0, M), (1, 1, G))


def test_stage_loss_probability_is_p_to_the_k() -> None:
    assert stage_loss_probability(0.1, 1) == pytest.approx(0.1)
    assert stage_loss_probability(0.1, 2) == pytest.approx(0.01)
    assert stage_loss_probability(0.00435, 2) == pytest.approx(1.892e-5, rel=1e-3)
    with pytest.raises(ConfigError):
        stage_loss_probability(0.1, 0)
    # the rate: 3 stages x 20000 steps, K = 2, p = 0.2, rules off: losses 3 * 20000 * 0.04 = 2400 (sd ~48),
    # member kills 3 * 20000 * 2 * 0.2 * 0.8 = 19200 (sd ~120)
    s = generate_schedule(seed=2, p=0.2, steps=20_001, num_stages=3, at_risk=(1, 2, 3), replicas=2, min_gap=1,
                          max_per_step=3)
    members, losses = expected_group_failures(0.2, 20_001, [2, 2, 2])
    assert (members, losses) == (pytest.approx(19200), pytest.approx(2400))
    assert len(s.stage_losses) == pytest.approx(losses, rel=0.06)
    assert len(s.member_kills) == pytest.approx(members, rel=0.03)
    assert s.suppressed == 0


def test_a_larger_k_loses_a_stage_only_where_a_smaller_one_does() -> None:
    rules_off = {"min_gap": 1, "max_per_step": L + 1}
    by_k = {k: _gen(p=0.05, steps=3000, replicas=k, **rules_off) for k in (1, 2, 3)}
    lost = {k: {(e.step, e.stage) for e in s.stage_losses} for k, s in by_k.items()}
    assert lost[3] <= lost[2] <= lost[1] and len(lost[3]) < len(lost[2]) < len(lost[1])
    # with groups, a stage's node failures are the K = 1 failures plus the other slots' hits
    hit2 = {(e.step, e.stage) for e in by_k[2].events}
    assert lost[1] <= hit2


def test_member_kills_and_stage_losses_under_the_default_rules() -> None:
    s = _gen(p=0.02, steps=3000, replicas=2)
    assert s.member_kills and s.stage_losses
    assert all(e.stage in (1, 2, 3, 4) and e.kind in (G, M) for e in s.events)
    steps = sorted({e.step for e in s.events})
    assert all(b - a >= 10 for a, b in itertools.pairwise(steps))  # the gap counts failures of either kind
    assert all(sum(1 for e in s.events if e.step == step) == 1 for step in steps)  # K = 2: one kill a step
    expected_members, _ = expected_group_failures(0.02, 3000, [2] * 4, 1, 10)
    assert len(s.member_kills) == pytest.approx(expected_members, rel=0.25)


def test_expected_group_failures_by_hand() -> None:
    # 100 eligible steps, 2 stages of 2 members, p = 0.1: P(loss) = 0.01, P(one member) = 2 * 0.1 * 0.9 = 0.18
    assert expected_group_failures(0.1, 101, [2, 2]) == (pytest.approx(36.0), pytest.approx(2.0))
    # one stage per step: losses E[min(G, 1)] = 1 - 0.99^2 = 0.0199; member kills only when no stage is lost
    # and one has a member hit: P(no loss) - P(nothing) = 0.99^2 - 0.81^2 = 0.324
    assert expected_group_failures(0.1, 101, [2, 2], 1) == (pytest.approx(32.4), pytest.approx(1.99))
    # gap 10: divided by 1 + 9 * q, q = 1 - 0.9^4 = 0.3439
    members, losses = expected_group_failures(0.1, 101, [2, 2], 1, 10)
    assert members == pytest.approx(32.4 / 4.0951) and losses == pytest.approx(1.99 / 4.0951)
    # K = 3 without a cap: per stage 3 * 0.1 * (1 - 0.01) = 0.297 member kills, 0.001 losses
    assert expected_group_failures(0.1, 101, [3]) == (pytest.approx(29.7), pytest.approx(0.1))
    # groups of one are the one-node model
    for cap, gap in ((None, 1), (1, 1), (1, 10), (2, 5)):
        assert expected_group_failures(0.01, 101, [1] * 4, cap, gap) == (
            0.0, pytest.approx(expected_failures(0.01, 101, 4, cap, gap)))


def test_group_schedule_json_round_trip_and_validation() -> None:
    s = _gen(p=0.02, steps=3000, replicas=2, rate=10.0)
    data = s.to_dict()
    assert data["format"] == 2 and data["replicas"] == 2
    assert {e["kind"] for e in data["events"]} == {G, M}
    assert FailureSchedule.from_json(s.to_json()) == s
    base = {"seed": 0, "p": 0.1, "steps": 20, "num_stages": 2, "at_risk": [0, 1, 2], "replicas": 2}

    def load(*events: dict):
        return FailureSchedule.from_dict({**base, "events": list(events)})

    assert load({"step": 3, "stage": 1, "kind": "member"}, {"step": 5, "stage": 2}).events == ((3, 1, M), (5, 2, G))
    with pytest.raises(ConfigError, match="kind 'node'"):
        load({"step": 3, "stage": 1, "kind": "node"})
    with pytest.raises(ConfigError, match="at least one member"):
        load({"step": 3, "stage": 1, "kind": "member"}, {"step": 3, "stage": 1, "kind": "member"})
    with pytest.raises(ConfigError, match="one 'group' event"):
        load({"step": 3, "stage": 1, "kind": "group"}, {"step": 3, "stage": 1, "kind": "member"})
    with pytest.raises(ConfigError, match="stage 1, whose group has 1 member"):  # one node: it can only be lost
        FailureSchedule.from_dict({**base, "replicas": 1, "events": [{"step": 3, "stage": 1, "kind": "member"}]})
    for k in (0, 17):
        with pytest.raises(ConfigError, match=r"--replicas must be 1\.\.16"):
            _gen(replicas=k)
    with pytest.raises(ConfigError, match="unsupported"):
        FailureSchedule.from_dict({**base, "format": 3})
