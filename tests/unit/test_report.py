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
    match_recoveries,
    overhead_pct,
    recovery_penalties,
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
    assert cf["failures"] == cf["recoveries"] == 1
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
    assert summary_line(rows[2], 2.5) == ("| copy | 10%/h | 10 | 12.0 | 0.833 | +20.0% | 2.4000 | 11.3 | 1.21x | 1 "
                                          "| 0.60 / 0.60 | 2.5 | +0.7000 / +0.7000 | ok |")
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
    assert rows == [{"strategy": "checkfree", "level": "10%/h", "stage": 2, "planned_step": 4, "step": 4,
                     "time_s": 4.5, "rebuild_s": 0.8, "fetch_s": 0.1, "how": "grad-avg",
                     "downtime_s": pytest.approx(2.5), "penalty": pytest.approx(0.4)}]


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
    assert "| checkfree | 10%/h | 2 | 4 | 4 | 4.5 | grad-avg | 0.80 |" in md  # the failures table
    assert "* target_val_loss: 2.04\n" in md


def test_write_report_without_failures_or_baseline(tmp_path) -> None:
    paths = write_report(str(tmp_path), [none_run()])
    md = open(paths["md"], encoding="utf-8").read()
    assert "No failures were injected." in md
    paths = write_report(str(tmp_path / "b"), [checkfree_run()])
    md = open(paths["md"], encoding="utf-8").read()
    assert "| no target |" in md and "* target_source: none" in md
