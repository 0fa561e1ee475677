"""The experiment runner's pure decisions: strategies to node flags, options, failure levels, schedules per
strategy, kill arguments, and run records from the nodes' events."""

from __future__ import annotations

import pytest

from cfnode.errors import ConfigError
from cfnode.experiment.runner import (
    ExperimentOptions,
    FailureLevel,
    effective_compression,
    failure_levels,
    kill_args,
    load_schedules,
    mean_step_s,
    parse_floats,
    plan_schedules,
    replayed_levels,
    run_record,
    split_csv,
    strategy_plan,
)
from cfnode.experiment.schedule import FailureSchedule, at_risk_stages, step_probability


def test_strategies_map_to_node_flags() -> None:
    assert strategy_plan("none").injects is False
    cf = strategy_plan("checkfree")
    assert (cf.recovery, cf.recovery_rule, cf.injects) == ("checkfree", "grad-avg", True)
    plus = strategy_plan("checkfree+")
    assert (plus.recovery, plus.recovery_rule) == ("checkfree+", "grad-avg")
    for rule in ("uniform-avg", "copy", "random"):
        p = strategy_plan(rule)
        assert (p.recovery, p.recovery_rule, p.injects) == ("checkfree", rule, True)


@pytest.mark.parametrize("name", ["checkpoint", "redundant"])
def test_baseline_strategies_map_to_their_recovery_mode(name) -> None:
    plan = strategy_plan(name)
    assert (plan.recovery, plan.injects) == (name, True)
    assert ExperimentOptions(strategies=("none", name), checkpoint_every=10).checkpoint_every == 10


def test_options_validation() -> None:
    ExperimentOptions()
    with pytest.raises(ConfigError, match="unknown strategy"):
        ExperimentOptions(strategies=("bogus",))
    with pytest.raises(ConfigError, match="twice"):
        ExperimentOptions(strategies=("none", "none"))
    with pytest.raises(ConfigError, match="stages >= 4"):
        ExperimentOptions(strategies=("checkfree+",), stages=3)
    with pytest.raises(ConfigError, match="not both"):
        ExperimentOptions(rates=(5.0,), probabilities=(0.01,))
    with pytest.raises(ConfigError, match=r"0\.\.100"):
        ExperimentOptions(rates=(120.0,))
    with pytest.raises(ConfigError, match="compression"):
        ExperimentOptions(compression=0.0)
    with pytest.raises(ConfigError, match="no such file"):
        ExperimentOptions(replay="/nonexistent/schedules.json")


def test_split_csv_and_parse_floats() -> None:
    assert split_csv("none, checkfree,,copy ") == ("none", "checkfree", "copy")
    assert parse_floats("5, 10,16.5", "--rates") == (5.0, 10.0, 16.5)
    assert parse_floats("", "--probabilities") == ()
    with pytest.raises(ConfigError, match="--rates takes comma-separated numbers"):
        parse_floats("5,x", "--rates")


def test_auto_compression_fixes_c_times_t() -> None:
    opts = ExperimentOptions(rates=(5.0, 10.0))
    levels = failure_levels(opts, step_s=None)  # T is not needed: c * T = 90 s
    assert levels == [FailureLevel(5.0, step_probability(5, 90)), FailureLevel(10.0, step_probability(10, 90))]
    assert failure_levels(opts, step_s=2.0) == levels  # nor does a measured T change p
    assert effective_compression(opts, 2.0) == pytest.approx(45.0)
    assert effective_compression(opts, None) is None
    assert levels[1].label == "10%/h" and levels[1].slug == "10pct"


def test_explicit_compression_uses_the_step_time() -> None:
    opts = ExperimentOptions(rates=(10.0,), compression=100.0)
    assert opts.needs_measured_step_time()
    assert failure_levels(opts, step_s=0.5)[0].p == pytest.approx(step_probability(10, 50))
    with pytest.raises(ConfigError, match="step time"):
        failure_levels(opts, step_s=None)
    given = ExperimentOptions(rates=(10.0,), compression=100.0, step_time_s=2.0)
    assert not given.needs_measured_step_time()
    assert failure_levels(given, step_s=0.5)[0].p == pytest.approx(step_probability(10, 200))


def test_probabilities_given_directly() -> None:
    opts = ExperimentOptions(rates=(), probabilities=(0.004,))
    assert failure_levels(opts, None) == [FailureLevel(None, 0.004)]
    assert FailureLevel(None, 0.004).label == "p=0.004"


def test_one_schedule_per_at_risk_set() -> None:
    opts = ExperimentOptions(strategies=("none", "checkfree", "copy", "checkfree+"), rates=(16.0,), steps=2000,
                             seed=3)
    scheds = plan_schedules(opts, failure_levels(opts, None), None)
    assert set(scheds) == {("16%/h", (1, 2, 3, 4)), ("16%/h", (0, 1, 2, 3, 4))}
    plain = scheds[("16%/h", at_risk_stages("checkfree", 4))]
    assert plain is scheds[("16%/h", at_risk_stages("copy", 4))]
    assert plain is scheds[("16%/h", at_risk_stages("none", 4))]
    assert plain.events and plain.seed == 3 and plain.rate == 16.0
    # a rerun with the same seed gives the same schedules
    assert plan_schedules(opts, failure_levels(opts, None), None) == scheds


def test_replay_uses_a_hand_written_schedule(tmp_path) -> None:
    path = tmp_path / "schedule.json"
    hand = FailureSchedule(seed=0, p=0.0, steps=15, num_stages=3, at_risk=(1, 2, 3), events=((6, 2),))
    path.write_text(hand.to_json())
    opts = ExperimentOptions(strategies=("none", "checkfree"), steps=15, stages=3, replay=str(path))
    loaded = load_schedules(str(path))
    assert loaded == [hand]
    levels = replayed_levels(loaded)
    assert levels == [FailureLevel(None, 0.0)]
    scheds = plan_schedules(opts, levels, None, loaded)
    assert scheds == {("p=0", (1, 2, 3)): hand}
    assert kill_args(hand) == ("2@6",)
    with pytest.raises(ConfigError, match="L=3, 15 steps"):
        plan_schedules(ExperimentOptions(steps=15, stages=4, replay=str(path)), levels, None, loaded)


def test_replay_fills_a_missing_at_risk_set_from_the_same_draws(tmp_path) -> None:
    opts = ExperimentOptions(strategies=("checkfree",), rates=(16.0,), steps=3000, seed=9)
    first = plan_schedules(opts, failure_levels(opts, None), None)
    path = tmp_path / "schedules.json"
    path.write_text('{"schedules": [' + ",".join(s.to_json() for s in first.values()) + "]}")
    wider = ExperimentOptions(strategies=("checkfree", "checkfree+"), rates=(16.0,), steps=3000, seed=9,
                              replay=str(path))
    loaded = load_schedules(str(path))
    again = plan_schedules(wider, replayed_levels(loaded), None, loaded)
    assert again[("16%/h", (1, 2, 3, 4))] == first[("16%/h", (1, 2, 3, 4))]
    fresh = plan_schedules(ExperimentOptions(strategies=("checkfree+",), rates=(16.0,), steps=3000, seed=9),
                           failure_levels(wider, None), None)
    assert again[("16%/h", (0, 1, 2, 3, 4))].events == fresh[("16%/h", (0, 1, 2, 3, 4))].events


def _events() -> list[dict]:
    t = 1000.0
    return [
        {"event": "online", "ts": t - 5, "stage": 0, "node": "stage0"},
        {"event": "training_started", "ts": t, "step": 0, "node": "stage0"},
        {"event": "step", "ts": t + 1.01, "time": t + 1.0, "step": 1, "loss": 8.0, "step_s": 1.0, "val_loss": 8.1,
         "node": "stage0"},
        {"event": "step", "ts": t + 1.5, "time": t + 1.5, "step": 2, "loss": 7.5, "step_s": 0.5, "node": "stage0"},
        {"event": "step_aborted", "ts": t + 2.0, "step": 3, "node": "stage0"},
        {"event": "recovery_started", "ts": t + 4.0, "stage": 2, "node": "spare0"},
        {"event": "recovery_finished", "ts": t + 4.5, "stage": 2, "step": 2, "duration_s": 0.4, "fetch_s": 0.1,
         "how": "grad-avg", "rule": "grad-avg", "node": "spare0"},
        {"event": "step", "ts": t + 6.0, "time": t + 6.0, "step": 3, "loss": 7.0, "step_s": 1.5, "val_loss": 7.2,
         "node": "stage0"},
    ]


def test_run_record_from_events() -> None:
    kills = [{"stage": 2, "at_step": 2, "killed_at_step": 2, "ts": 1001.75, "node": "stage2", "respawned": True}]
    rec = run_record(strategy="checkfree", level=FailureLevel(10.0, 0.0026), events=_events(), kills=kills,
                     planned_steps=3, exit_code=0, meta={"workdir": "/x"})
    assert rec.level == "10%/h" and rec.rate == 10.0 and rec.p == 0.0026 and rec.status == "ok"
    assert rec.steps == [
        {"step": 1, "time_s": 1.0, "loss": 8.0, "val_loss": 8.1, "step_s": 1.0},
        {"step": 2, "time_s": 1.5, "loss": 7.5, "val_loss": None, "step_s": 0.5},
        {"step": 3, "time_s": 6.0, "loss": 7.0, "val_loss": 7.2, "step_s": 1.5},
    ]
    assert rec.events == [
        {"kind": "failure", "stage": 2, "planned_step": 2, "step": 2, "time_s": 1.75, "node": "stage2"},
        {"kind": "recovery", "stage": 2, "step": 2, "time_s": 4.5, "duration_s": 0.4, "fetch_s": 0.1,
         "how": "grad-avg", "rule": "grad-avg", "degraded": None, "node": "spare0"},
    ]
    assert rec.meta == {"steps_aborted": 1, "workdir": "/x"}
    assert mean_step_s(rec) == pytest.approx(1.0)  # (0.5 + 1.5) / 2, the first step left out


def test_run_record_of_a_failure_free_or_broken_run() -> None:
    rec = run_record(strategy="none", level=None, events=[], kills=[], planned_steps=10, exit_code=5)
    assert rec.steps == [] and rec.events == [] and rec.status == "exit 5" and rec.level is None
    assert mean_step_s(rec) is None
