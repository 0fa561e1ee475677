"""The experiment runner's pure decisions: strategies to node flags, options, failure levels, schedules per
strategy, kill arguments (member kills and stage losses), run records from the nodes' events, and the
`experiment` command's one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cfnode.cli import main
from cfnode.errors import ConfigError
from cfnode.experiment.runner import (
    ExperimentOptions,
    FailureLevel,
    describe_events,
    effective_compression,
    expected_per_run,
    failure_levels,
    load_schedules,
    parse_floats,
    plan_schedules,
    replayed_levels,
    split_csv,
    strategy_plan,
)
from cfnode.experiment.schedule import Failure, FailureSchedule, at_risk_stages, step_probability
from cfnode.experiment.swarmrun import KillArgs, kill_args, mean_step_s, run_record


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
    assert kill_args(hand) == KillArgs(("2@6",), ())  # one node per stage: the stage loss is a --kill
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
        {"kind": "failure", "stage": 2, "planned_step": 2, "step": 2, "time_s": 1.75, "node": "stage2",
         "loss": "stage", "nodes": ["stage2"]},
        {"kind": "recovery", "stage": 2, "step": 2, "time_s": 4.5, "duration_s": 0.4, "fetch_s": 0.1,
         "how": "grad-avg", "rule": "grad-avg", "degraded": None, "node": "spare0"},
    ]
    assert rec.meta == {"steps_aborted": 1, "workdir": "/x"}
    assert mean_step_s(rec) == pytest.approx(1.0)  # (0.5 + 1.5) / 2, the first step left out


def test_run_record_of_a_failure_free_or_broken_run() -> None:
    rec = run_record(strategy="none", level=None, events=[], kills=[], planned_steps=10, exit_code=5)
    assert rec.steps == [] and rec.events == [] and rec.status == "exit 5" and rec.level is None
    assert mean_step_s(rec) is None


# -- stage groups (--replicas K) --------------------------------------------------------------------------------


def test_replicas_option() -> None:
    assert ExperimentOptions().replicas == 1
    opts = ExperimentOptions(strategies=("none", "checkfree", "copy"), replicas=2)
    assert opts.replicas == 2
    for k in (0, 17):
        with pytest.raises(ConfigError, match=r"--replicas must be 1\.\.16"):
            ExperimentOptions(replicas=k)
    with pytest.raises(ConfigError, match=r"--replicas 2 runs only .*; checkfree\+, checkpoint with stage groups"):
        ExperimentOptions(strategies=("checkfree", "checkfree+", "checkpoint"), replicas=2)


@pytest.mark.parametrize("args", [("--replicas", "0"), ("--replicas", "17"),
                                  ("--replicas", "2", "--strategies", "none,redundant")])
def test_experiment_replicas_errors_are_one_line_naming_the_flag(tmp_path, args) -> None:
    result = CliRunner().invoke(main, ["experiment", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--replicas" in errors[0], result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "out").exists()  # nothing started


def test_group_schedules_and_their_kill_flags() -> None:
    opts = ExperimentOptions(strategies=("none", "checkfree"), rates=(33.0,), steps=3000, seed=4, replicas=2)
    [sched] = plan_schedules(opts, failure_levels(opts, None), None).values()
    assert sched.replicas == 2 and sched.member_kills and sched.stage_losses
    one = plan_schedules(ExperimentOptions(strategies=("checkfree",), rates=(33.0,), steps=3000, seed=4),
                         failure_levels(opts, None), None)
    assert next(iter(one.values())).replicas == 1
    args = kill_args(sched)
    assert len(args.kill) == len(sched.member_kills) and len(args.kill_group) == len(sched.stage_losses)
    hand = FailureSchedule(seed=0, p=0.01, steps=20, num_stages=2, at_risk=(1, 2), replicas=2,
                           events=(Failure(5, 1, "member"), Failure(9, 2, "group"), Failure(14, 1, "member")))
    assert kill_args(hand) == KillArgs(("1@5", "1@14"), ("2@9",))
    assert describe_events(hand) == "m1@5, g2@9, m1@14"
    alone = FailureSchedule(seed=0, p=0.01, steps=20, num_stages=2, at_risk=(1, 2), events=((5, 1), (9, 2)))
    assert kill_args(alone) == KillArgs(("1@5", "2@9"), ()) and describe_events(alone) == "1@5, 2@9"
    assert isinstance(expected_per_run(alone), float)
    assert set(expected_per_run(hand)) == {"member kills", "stage losses"}


def test_replay_checks_the_replicas(tmp_path) -> None:
    path = tmp_path / "schedule.json"
    hand = FailureSchedule(seed=0, p=0.0, steps=15, num_stages=3, at_risk=(1, 2, 3), replicas=2,
                           events=(Failure(4, 1, "member"), Failure(9, 2, "group")))
    path.write_text(hand.to_json())
    loaded = load_schedules(str(path))
    opts = ExperimentOptions(strategies=("checkfree",), steps=15, stages=3, replay=str(path), replicas=2)
    assert plan_schedules(opts, replayed_levels(loaded), None, loaded) == {("p=0", (1, 2, 3)): hand}
    with pytest.raises(ConfigError, match="for --replicas 2; this experiment has --replicas 1"):
        plan_schedules(ExperimentOptions(strategies=("checkfree",), steps=15, stages=3, replay=str(path)),
                       replayed_levels(loaded), None, loaded)


def test_run_record_of_a_group_run() -> None:
    t = 1000.0
    events = [
        {"event": "training_started", "ts": t, "step": 0, "node": "stage0"},
        {"event": "joined_group", "ts": t + 0.5, "stage": 1, "source": "abc", "step": 0, "generation": 1,
         "duration_s": 0.3, "node": "stage1m1"},
        {"event": "member_admitted", "ts": t + 0.5, "stage": 1, "peer": "def", "source": "abc", "step": 0,
         "node": "stage0"},
        {"event": "step", "ts": t + 1.0, "time": t + 1.0, "step": 1, "loss": 8.0, "step_s": 1.0, "node": "stage0"},
        {"event": "step", "ts": t + 3.0, "time": t + 3.0, "step": 2, "loss": 7.0, "step_s": 1.0, "node": "stage0"},
        {"event": "joined_group", "ts": t + 6.0, "stage": 1, "source": "def", "step": 2, "generation": 1,
         "duration_s": 0.4, "node": "stage1m2"},
        {"event": "member_admission_timed_out", "ts": t + 7.0, "stage": 2, "peer": "xyz", "step": 2,
         "node": "stage0"},
    ]
    kills = [{"stage": 1, "at_step": 1, "killed_at_step": 1, "ts": t + 2.0, "node": "stage1",
              "nodes": ["stage1"], "whole_group": False, "members_before": 2, "member_loss": True}]
    rec = run_record(strategy="checkfree", level=None, events=events, kills=kills, planned_steps=2, exit_code=0)
    assert rec.events == [
        {"kind": "join", "stage": 1, "step": 0, "time_s": 0.5, "duration_s": 0.3, "source": "abc",
         "node": "stage1m1"},
        {"kind": "failure", "stage": 1, "planned_step": 1, "step": 1, "time_s": 2.0, "node": "stage1",
         "loss": "member", "nodes": ["stage1"]},
        {"kind": "join", "stage": 1, "step": 2, "time_s": 6.0, "duration_s": 0.4, "source": "def",
         "node": "stage1m2"},
    ]  # an exact join is a join, never a recovery; stage 0's member_admitted is the same join, not another
    assert rec.meta == {"steps_aborted": 0, "member_admissions_timed_out": 1}


def test_engine_option() -> None:
    assert ExperimentOptions().engine == "swarm"  # the default: real processes, as before
    assert ExperimentOptions(engine="local", compression=10.0, step_time_s=2.0).engine == "local"
    with pytest.raises(ConfigError, match="--engine must be one of swarm, local"):
        ExperimentOptions(engine="gpu")
    with pytest.raises(ConfigError, match="--engine local runs one node per stage"):
        ExperimentOptions(engine="local", replicas=2, strategies=("none", "checkfree"))
    with pytest.raises(ConfigError, match="--engine local measures no step time"):
        ExperimentOptions(engine="local", compression=10.0)  # T would have to come from a run


@pytest.mark.parametrize("args", [("--engine", "gpu"), ("--engine", "local", "--compression", "10")])
def test_experiment_engine_errors_are_one_line(tmp_path, args) -> None:
    result = CliRunner().invoke(main, ["experiment", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "engine" in errors[0], result.output
    assert not (tmp_path / "out").exists()
