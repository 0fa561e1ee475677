"""The experiment report: metrics on hand-made runs (numbers worked out by hand) and the four files."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cfnode.experiment.report import (
    CSV_COLUMNS,
    RunRecord,
    default_target,
    downtimes,
    failure_rows,
    interpolate,
    joins,
    match_recoveries,
    member_kills,
    other_copies,
    overhead_pct,
    recoveries,
    recovery_penalties,
    refills,
    stage_losses,
    steps_per_s,
    summarize,
    summary_line,
    time_to_target,
    val_points,
    wall_clock_s,
    write_report,
)

NONE_VALS = {2: 4.0, 4: 3.0, 6: 2.5, 8: 2.2, 10: 2.0}


def _steps(times: dict[int, float], vals: dict[int, float]) -> list[dict]:
    return [{"step": k, "time_s": t, "loss": 5.0 - 0.1 * k, "val_loss": vals.get(k)} for k, t in times.items()]


def none_run() -> RunRecord:
    """Steps 1..10 at t = step seconds; validation every 2 steps."""
    return RunRecord(strategy="none", steps=_steps({k: float(k) for k in range(1, 11)}, NONE_VALS),
                     planned_steps=10)


def failing_run(strategy: str, after: dict[int, float], rebuild_s: float) -> RunRecord:
    """Steps 1..4 at t = 1..4; stage 2 killed at t = 4.5 after step 4, rebuilt by t = 6.0; steps 5..10 at t = step
    + 2 (so the last step is at t = 12)."""
    times = {k: float(k) if k <= 4 else float(k + 2) for k in range(1, 11)}
    events = [{"kind": "failure", "stage": 2, "planned_step": 4, "step": 4, "time_s": 4.5},
              {"kind": "recovery", "stage": 2, "step": 4, "time_s": 6.0, "duration_s": rebuild_s, "fetch_s": 0.1,
               "how": "grad-avg"}]
    return RunRecord(strategy=strategy, level="10%/h", rate=10.0, p=0.0026, steps=_steps(times, {2: 4.0, 4: 3.0,
                     **after}), events=events, planned_steps=10)


def checkfree_run() -> RunRecord:
    return failing_run("checkfree", {6: 2.9, 8: 2.3, 10: 2.1}, 0.8)


def copy_run() -> RunRecord:
    return failing_run("copy", {6: 3.2, 8: 2.7, 10: 2.4}, 0.6)


# -- pure metrics ---------------------------------------------------------------------------------------------


def test_val_points_are_the_validated_steps_in_time_order() -> None:
    assert val_points(checkfree_run()) == [(2.0, 2, 4.0), (4.0, 4, 3.0), (8.0, 6, 2.9), (10.0, 8, 2.3),
                                           (12.0, 10, 2.1)]


def test_time_to_target_interpolates() -> None:
    pts = [(2.0, 4.0), (4.0, 3.0), (6.0, 2.5), (8.0, 2.2), (10.0, 2.0)]
    assert time_to_target(pts, 2.5) == pytest.approx(6.0)  # exactly on a point
    assert time_to_target(pts, 2.04) == pytest.approx(9.6)  # 8 + (2.2 - 2.04) / 0.2 * 2
    assert time_to_target(pts, 3.5) == pytest.approx(3.0)  # 2 + (4.0 - 3.5) / 1.0 * 2
    assert time_to_target(pts, 5.0) == pytest.approx(2.0)  # the first point is already below
    assert time_to_target(pts, 1.9) is None
    assert time_to_target([], 1.0) is None
    assert time_to_target([(1.0, math.nan), (3.0, 1.0)], 2.0) == 3.0  # no interpolation from NaN


def test_interpolate() -> None:
    pts = [(2.0, 4.0), (4.0, 3.0), (6.0, 2.5)]
    assert interpolate(pts, 3.0) == pytest.approx(3.5)
    assert interpolate(pts, 6.0) == pytest.approx(2.5)
    assert interpolate(pts, 1.0) is None
    assert interpolate(pts, 7.0) is None


def test_wall_clock_rate_and_overhead() -> None:
    none, cf = none_run(), checkfree_run()
    assert wall_clock_s(none) == 10.0 and steps_per_s(none) == pytest.approx(1.0)
    assert wall_clock_s(cf) == 12.0 and steps_per_s(cf) == pytest.approx(10 / 12)
    assert overhead_pct(steps_per_s(cf), steps_per_s(none)) == pytest.approx(20.0)
    assert overhead_pct(0.8, 1.0) == pytest.approx(25.0)
    assert overhead_pct(None, 1.0) is None


def test_downtime_and_penalty() -> None:
    none, cf, cp = none_run(), checkfree_run(), copy_run()
    assert downtimes(cf) == [pytest.approx(2.5)]  # killed at 4.5, next step at 7.0
    # first validation after the rebuild (t=6.0) is step 6 at t=8; the failure-free run has 2.5 at step 6
    assert recovery_penalties(cf, none) == [pytest.approx(0.4)]
    assert recovery_penalties(cp, none) == [pytest.approx(0.7)]
    assert recovery_penalties(cf, None) == [None]


def test_downtime_ends_with_the_first_step_after_the_rebuild() -> None:
    run = checkfree_run()
    # the step in flight when the kill landed still commits (t=4.6), before the rebuild at t=6.0
    run.steps.insert(4, {"step": 5, "time_s": 4.6, "loss": 4.5, "val_loss": None})
    assert downtimes(run) == [pytest.approx(2.5)]
    run.events = run.events[:1]  # never rebuilt: the next step counts
    assert downtimes(run) == [pytest.approx(0.1)]
    run.steps = run.steps[:5]
    run.events = checkfree_run().events
    assert downtimes(run) == [None]  # nothing committed after the rebuild


def test_each_failure_gets_its_own_rebuild() -> None:
    run = checkfree_run()
    run.events = [{"kind": "failure", "stage": 2, "time_s": 1.0}, {"kind": "failure", "stage": 2, "time_s": 3.0},
                  {"kind": "recovery", "stage": 2, "time_s": 2.0}, {"kind": "recovery", "stage": 2, "time_s": 5.0},
                  {"kind": "failure", "stage": 1, "time_s": 6.0}]
    assert match_recoveries(run) == [0, 1, None]


def test_penalty_interpolates_the_baseline_by_step() -> None:
    none = none_run()
    run = failing_run("checkfree", {7: 2.6}, 0.5)  # validated at step 7 (t=9) only after the rebuild
    # baseline at step 7: halfway between 2.5 (step 6) and 2.2 (step 8) = 2.35
    assert recovery_penalties(run, none) == [pytest.approx(0.25)]


def test_default_target() -> None:
    assert default_target([checkfree_run(), none_run()]) == pytest.approx(2.04)
    assert default_target([checkfree_run()]) is None


def test_summary_rows() -> None:
    rows = {r["strategy"]: r for r in summarize([none_run(), checkfree_run(), copy_run()], target=2.5)}
    none, cf, cp = rows["none"], rows["checkfree"], rows["copy"]
    assert none["overhead_pct"] == 0.0 and none["time_to_target_s"] == pytest.approx(6.0)
    assert none["ttt_vs_checkfree"] is None and none["failures"] == 0 and none["penalty_mean"] is None
    assert cf["steps"] == 10 and cf["wall_s"] == 12.0 and cf["overhead_pct"] == pytest.approx(20.0)
    assert cf["final_val_loss"] == 2.1
    assert cf["time_to_target_s"] == pytest.approx(8 + 0.4 / 0.6 * 2)  # 9.333
    assert cf["ttt_vs_checkfree"] == pytest.approx(1.0)
    assert cp["time_to_target_s"] == pytest.approx(10 + 0.2 / 0.3 * 2)  # 11.333
    assert cp["ttt_vs_checkfree"] == pytest.approx(17 / 14)  # 11.333 / 9.333
    assert cf["failures"] == cf["stage_losses"] == cf["rebuilds"] == cf["nodes_killed"] == 1
    assert cf["member_kills"] == cf["exact_copies"] == 0 and cf["member_downtime_mean_s"] is None
    assert cf["rebuild_mean_s"] == cf["rebuild_max_s"] == 0.8 and cp["rebuild_mean_s"] == 0.6
    assert cf["downtime_mean_s"] == pytest.approx(2.5)
    assert cf["penalty_mean"] == pytest.approx(0.4) and cp["penalty_max"] == pytest.approx(0.7)
    assert cf["status"] == "ok"


def test_default_target_is_not_reached_by_the_failing_runs() -> None:
    runs = [none_run(), checkfree_run()]
    rows = summarize(runs, default_target(runs))
    assert rows[0]["time_to_target_s"] == pytest.approx(9.6)
    assert rows[1]["time_to_target_s"] is None


def test_summary_line_formatting() -> None:
    rows = summarize([none_run(), checkfree_run(), copy_run()], target=2.5)
    assert summary_line(rows[2], 2.5) == ("| copy | 10%/h | 10 | 12.0 | 0.833 | +20.0% | 2.4000 | 11.3 | 1.21x "
                                          "| 0 | 1 | 0 + 0 | 1 | 0.60 / 0.60 | 2.5 / – | +0.7000 / +0.7000 | ok |")
    assert "| not reached |" in summary_line(summarize([none_run(), checkfree_run()], 2.0)[1], 2.0)
    assert "| no target |" in summary_line(rows[0], None)


def test_status() -> None:
    assert none_run().status == "ok"
    short = none_run()
    short.planned_steps = 12
    assert short.status == "stopped at 10"
    crashed = none_run()
    crashed.exit_code = 5
    assert crashed.status == "exit 5"


def test_failure_rows_pair_each_kill_with_its_rebuild() -> None:
    rows = failure_rows([none_run(), checkfree_run()])
    assert rows == [{"strategy": "checkfree", "level": "10%/h", "stage": 2, "loss": "stage", "nodes_killed": 1,
                     "planned_step": 4, "step": 4, "time_s": 4.5, "rebuild_s": 0.8, "fetch_s": 0.1,
                     "how": "grad-avg", "exact_copies": 0, "copy_s": None, "downtime_s": pytest.approx(2.5),
                     "penalty": pytest.approx(0.4)}]


def test_record_round_trip() -> None:
    run = checkfree_run()
    assert RunRecord.from_dict(json.loads(json.dumps(run.to_dict()))) == run


# -- writers --------------------------------------------------------------------------------------------------


def test_write_report(tmp_path) -> None:
    diverged = failing_run("random", {6: math.nan, 8: math.inf, 10: 9.0}, 0.7)
    runs = [none_run(), checkfree_run(), copy_run(), diverged]
    paths = write_report(str(tmp_path), runs, meta={"seed": 0, "preset": "tiny"},
                         schedules=[{"seed": 0, "events": [{"step": 4, "stage": 2}]}])
    assert set(paths) == {"csv", "json", "md", "png"}

    with open(paths["csv"], encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 1 + 5 * 4  # five validation points per run
    assert rows[1] == ["none", "", "", "", "2", "2.0", "4.8", "4.0"]
    assert rows[6][:4] == ["checkfree", "10%/h", "10.0", "0.0026"]

    with open(paths["json"], encoding="utf-8") as f:
        data = json.load(f)  # strict: NaN/inf were written as null
    assert set(data) == {"format", "meta", "summary", "failures", "runs", "schedules"}
    assert data["meta"]["target_val_loss"] == pytest.approx(2.04) and data["meta"]["seed"] == 0
    assert [r["strategy"] for r in data["summary"]] == ["none", "checkfree", "copy", "random"]
    assert len(data["failures"]) == 3 and data["schedules"][0]["events"] == [{"step": 4, "stage": 2}]
    assert data["runs"][3]["steps"][5]["val_loss"] is None

    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    md = open(paths["md"], encoding="utf-8").read()
    for strategy in ("none", "checkfree", "copy", "random"):
        assert any(line.startswith(f"| {strategy} |") for line in md.splitlines()), strategy
    assert "| checkfree | 10%/h | 2 | stage | 4 | 4 | 4.5 | grad-avg | 0.80 | 0.10 | 0 | 2.5 |" in md  # failures
    assert "* target_val_loss: 2.04\n" in md


def test_write_report_without_failures_or_baseline(tmp_path) -> None:
    paths = write_report(str(tmp_path), [none_run()])
    md = open(paths["md"], encoding="utf-8").read()
    assert "No failures were injected." in md
    paths = write_report(str(tmp_path / "b"), [checkfree_run()])
    md = open(paths["md"], encoding="utf-8").read()
    assert "| no target |" in md and "* target_source: none" in md


# -- stage groups: member kills, stage losses, exact copies vs rebuilds ----------------------------------------


def group_run() -> RunRecord:
    """K = 2, steps 1..5 at t = step, 6..10 at t = step + 1.5. The groups of stages 1 and 2 form by exact copy at
    t = 0.2 / 0.3; one member of stage 1 is killed at t = 2.5 (routed around, refilled by an exact copy at 4.2);
    stage 2's whole group is killed at t = 5.5, rebuilt by CheckFree at 7.0 and refilled by a copy at 9.5."""
    times = {k: float(k) if k <= 5 else k + 1.5 for k in range(1, 11)}
    events = [
        {"kind": "join", "stage": 1, "step": 0, "time_s": 0.2, "duration_s": 0.3, "node": "stage1m1"},
        {"kind": "join", "stage": 2, "step": 0, "time_s": 0.3, "duration_s": 0.3, "node": "stage2m1"},
        {"kind": "failure", "stage": 1, "planned_step": 2, "step": 2, "time_s": 2.5, "loss": "member",
         "nodes": ["stage1"]},
        {"kind": "join", "stage": 1, "step": 4, "time_s": 4.2, "duration_s": 0.4, "node": "stage1m2"},
        {"kind": "failure", "stage": 2, "planned_step": 5, "step": 5, "time_s": 5.5, "loss": "stage",
         "nodes": ["stage2", "stage2m1"]},
        {"kind": "recovery", "stage": 2, "step": 5, "time_s": 7.0, "duration_s": 0.5, "fetch_s": 0.2,
         "how": "grad-avg"},
        {"kind": "join", "stage": 2, "step": 7, "time_s": 9.5, "duration_s": 0.35, "node": "stage2m2"},
    ]
    return RunRecord(strategy="checkfree", level="10%/h", rate=10.0, p=0.0026,
                     steps=_steps(times, {2: 4.0, 4: 3.0, 6: 2.6, 8: 2.3, 10: 2.1}), events=events,
                     planned_steps=10)


def test_member_kills_stage_losses_and_exact_copies_are_told_apart() -> None:
    run = group_run()
    assert [f["stage"] for f in member_kills(run)] == [1] and [f["stage"] for f in stage_losses(run)] == [2]
    assert len(joins(run)) == 4 and len(recoveries(run)) == 1
    assert match_recoveries(run) == [None, 0]  # the member loss is never rebuilt
    assert refills(run) == [[2], [3]] and other_copies(run) == 2
    # member loss: killed at 2.5, the next step at 3.0; stage loss: rebuilt at 7.0, the next step at 7.5
    assert downtimes(run) == [pytest.approx(0.5), pytest.approx(2.0)]
    [row] = summarize([run], target=None)
    assert (row["failures"], row["member_kills"], row["stage_losses"], row["nodes_killed"]) == (2, 1, 1, 3)
    assert (row["exact_copies"], row["refill_copies"], row["other_copies"], row["rebuilds"]) == (4, 2, 2, 1)
    assert row["downtime_mean_s"] == pytest.approx(2.0) and row["member_downtime_mean_s"] == pytest.approx(0.5)
    assert row["rebuild_mean_s"] == 0.5
    assert " | 1 | 1 | 2 + 2 | 1 | 0.50 / 0.50 | 2.0 / 0.5 | " in summary_line(row, None)


def test_an_exact_join_is_never_a_rebuild() -> None:
    run = group_run()
    run.events = [e for e in run.events if e["kind"] != "recovery"]  # stage 2's group was never rebuilt
    assert match_recoveries(run) == [None, None]
    [row] = summarize([run], target=None)
    assert row["rebuilds"] == 0 and row["rebuild_mean_s"] is None and row["exact_copies"] == 4
    rows = failure_rows([run])
    assert [r["how"] for r in rows] == ["routed-around", None] and [r["rebuild_s"] for r in rows] == [None, None]
    assert recovery_penalties(run, none_run()) == []  # no rebuild, no penalty
    # a rebuild of a stage that only lost a member (say the last member was also lost unplanned) is a rebuild,
    # but not the member loss's: it stays unmatched
    run = group_run()
    run.events.append({"kind": "recovery", "stage": 1, "step": 3, "time_s": 3.5, "duration_s": 0.1})
    run.events.sort(key=lambda e: e["time_s"])
    assert match_recoveries(run) == [None, 1] and summarize([run], None)[0]["rebuilds"] == 2


def test_group_failure_rows_and_markdown(tmp_path) -> None:
    rows = failure_rows([none_run(), group_run()])
    member, stage = rows
    assert (member["loss"], member["nodes_killed"], member["how"], member["exact_copies"], member["copy_s"]) == (
        "member", 1, "routed-around", 1, 0.4)
    assert member["rebuild_s"] is None and member["penalty"] is None
    assert (stage["loss"], stage["nodes_killed"], stage["how"], stage["rebuild_s"], stage["exact_copies"]) == (
        "stage", 2, "grad-avg", 0.5, 1)
    # first validation after the rebuild (t=7.0) is step 6 (t=7.5): 2.6 - 2.5
    assert stage["penalty"] == pytest.approx(0.1) and stage["downtime_s"] == pytest.approx(2.0)
    paths = write_report(str(tmp_path), [none_run(), group_run()])
    md = open(paths["md"], encoding="utf-8").read()
    assert "| checkfree | 10%/h | 1 | member | 2 | 2 | 2.5 | routed-around | – | – | 1 (0.40) | 0.5 | – |" in md
    assert "| checkfree | 10%/h | 2 | stage | 5 | 5 | 5.5 | grad-avg | 0.50 | 0.20 | 1 (0.35) | 2.0 | +0.1000 |" in md
    assert "| member kills | stage losses | exact copies (refill + other) | rebuilds |" in md
    with open(paths["json"], encoding="utf-8") as f:
        data = json.load(f)
    assert [(r["member_kills"], r["stage_losses"], r["exact_copies"], r["rebuilds"]) for r in data["summary"]] == [
        (0, 0, 0, 0), (1, 1, 4, 1)]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_records_from_before_groups_are_stage_losses() -> None:
    run = checkfree_run()  # failures without a `loss` field
    assert run.events[0].get("loss") is None
    assert len(stage_losses(run)) == 1 and not member_kills(run) and match_recoveries(run) == [0]
