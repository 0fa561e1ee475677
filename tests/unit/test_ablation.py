"""The rule ablation's reductions (cfnode/experiment/ablation.py), on hand-computed runs."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest

from cfnode.experiment import ablation


def run(strategy: str, val: list[tuple[int, float]], failures: list[tuple[int, int]] = (),
        rebuilds: list[tuple[int, int]] = ()) -> dict[str, Any]:
    """A compact run whose time is its step (a failure and its rebuild at step s: times s + 0.1 and s + 0.5)."""
    return {"strategy": strategy, "status": "ok", "val": [[s, float(s), v] for s, v in val],
            "failures": [[s, s + 0.1, stage] for s, stage in failures],
            "rebuilds": [[s, s + 0.5, stage, "grad-avg"] for s, stage in rebuilds]}


BASE = [(0, 8.0), (10, 7.0), (20, 6.0), (30, 5.5)]


def test_mean_interval_is_student_t() -> None:
    m, h = ablation.mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0
    assert h == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    single = ablation.mean_interval([4.0])
    assert single[0] == 4.0 and math.isnan(single[1])
    assert ablation.mean_interval([]) is None


def test_rebuild_penalty_removes_the_baselines_progress() -> None:
    # failure after step 10 (val 7.0 before), rebuilt; val 6.9 at step 20 where the baseline fell 7.0 -> 6.0
    r = run("copy", [(0, 8.0), (10, 7.0), (20, 6.9), (30, 6.0)], failures=[(10, 2)], rebuilds=[(10, 2)])
    assert ablation.rebuild_penalties(r, run("none", BASE)) == [pytest.approx((6.9 - 7.0) - (6.0 - 7.0))]


def test_a_rebuild_without_validation_on_one_side_or_without_its_failure_is_not_measured() -> None:
    base = run("none", BASE)
    after_the_last = run("copy", BASE, failures=[(30, 1)], rebuilds=[(30, 1)])
    orphan = run("copy", BASE, rebuilds=[(10, 1)])
    assert ablation.rebuild_penalties(after_the_last, base) == []
    assert ablation.rebuild_penalties(orphan, base) == []


def test_the_second_half_gap_averages_the_distance_to_the_failure_free_curve() -> None:
    base = run("none", [(0, 8.0), (10, 7.0), (20, 6.0), (30, 5.0), (40, 4.0)])
    r = run("copy", [(0, 8.0), (10, 7.1), (20, 6.2), (30, 5.3), (40, 4.1)])
    # steps >= 20: gaps 0.2, 0.3, 0.1
    assert ablation.window_gap(r, base) == pytest.approx(0.2)
    assert ablation.window_mean(base) == pytest.approx(5.0)
    assert ablation.window_gap(run("copy", []), base) is None


def raw_of(seeds: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"format": ablation.RAW_FORMAT, "settings": {"probabilities": [0.02]},
            "seeds": {str(s): runs for s, runs in seeds.items()}}


def test_the_final_loss_is_the_mean_of_the_last_five_validations() -> None:
    r = run("none", [(0, 9.0), (10, 8.0), (20, 6.0), (30, 5.0), (40, 5.2), (50, 4.8), (60, 5.0)])
    assert ablation.final_val(r) == pytest.approx((6.0 + 5.0 + 5.2 + 4.8 + 5.0) / 5)
    assert ablation.final_val(run("none", [(0, 9.0), (10, 8.0)])) == pytest.approx(8.5)
    assert ablation.final_val(run("none", [])) is None


def test_summary_pairs_each_rule_with_its_own_seeds_baseline_and_checks_the_criterion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ablation, "FINAL_POINTS", 1)  # the last validation alone, for round figures
    # baselines end at 5.50 / 5.52 / 5.54 (SD 0.02); random ends 0.30 above its seed's baseline every time
    seeds = {}
    for s, end in enumerate((5.50, 5.52, 5.54)):
        base = [(0, 8.0), (10, 7.0), (20, 6.0), (30, end)]
        rnd = [(0, 8.0), (10, 7.0), (20, 6.5), (30, end + 0.3)]
        seeds[s] = [run("none", base), run("random", rnd, failures=[(10, 1)], rebuilds=[(10, 1)])]
    summary = ablation.summarize(raw_of(seeds))
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert [r["strategy"] for r in summary["rows"]] == ["none", "random"]
    assert rows["none"]["final"][0] == pytest.approx(5.52) and rows["none"]["final_penalty"] is None
    assert rows["random"]["final_penalty"][0] == pytest.approx(0.3)
    assert rows["random"]["final_penalty"][1] == pytest.approx(0.0, abs=1e-12)  # the same penalty on every seed
    assert rows["random"]["rebuild_penalty"][0] == pytest.approx(0.5)  # (6.5 - 7.0) - (6.0 - 7.0)
    assert rows["random"]["rebuilds"] == 3 and rows["random"]["measured_rebuilds"] == 3
    c = summary["criterion"]
    assert c["baseline_sd"] == pytest.approx(0.02)
    assert c["final_penalty_met"] and c["rebuild_penalty_met"]  # 0.3 and 0.5 > 5 * 0.02
    # second halves (steps >= 15): the baselines' means 5.75 / 5.76 / 5.77 (SD 0.01), random's gap (0.5 + 0.3) / 2
    assert c["baseline_window_sd"] == pytest.approx(0.01)
    assert rows["random"]["window_gap"][0] == pytest.approx(0.4) and c["window_gap_met"]


def test_the_criterion_fails_when_seeds_scatter_more_than_the_rule_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ablation, "FINAL_POINTS", 1)
    seeds = {s: [run("none", [(0, 8.0), (30, end)]), run("random", [(0, 8.0), (30, end + 0.05)])]
             for s, end in enumerate((5.0, 5.2, 5.4))}
    c = ablation.summarize(raw_of(seeds))["criterion"]
    assert c["baseline_sd"] == pytest.approx(0.2)
    assert c["final_penalty"] == pytest.approx(0.05) and not c["final_penalty_met"]


def test_mean_curves_use_the_steps_every_seed_validated() -> None:
    seeds = {0: [run("none", [(0, 8.0), (10, 7.0), (20, 6.0)])], 1: [run("none", [(0, 6.0), (20, 5.0)])]}
    steps, mean, lo, hi = ablation.mean_curves(raw_of(seeds))["none"]
    assert (steps, mean, lo, hi) == ([0, 20], [7.0, 5.5], [6.0, 5.0], [8.0, 6.0])


def results_json(seed: int, lr: float = 1e-3) -> dict[str, Any]:
    """An experiment's results.json as runner.write_report writes it, with one failure-free run."""
    steps = [{"step": 1, "time_s": 1.0, "loss": 8.0, "val_loss": 7.5}, {"step": 2, "time_s": 2.0, "loss": 7.0,
                                                                         "val_loss": None}]
    return {"meta": {"options": {"seed": seed, "lr": lr, "out": f"seed{seed}", "jobs": 2, "strategies": ["none"]}},
            "runs": [{"strategy": "none", "status": "ok", "steps": steps,
                      "events": [{"kind": "failure", "step": 1, "time_s": 1.5, "stage": 2},
                                 {"kind": "recovery", "step": 1, "time_s": 1.7, "stage": 2, "how": "grad-avg"}]}]}


def test_read_experiments_keeps_one_seed_per_directory_and_refuses_mixed_settings(tmp_path: Any) -> None:
    dirs = []
    for seed, lr in ((0, 1e-3), (1, 1e-3), (2, 2e-3)):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(results_json(seed, lr)))
        dirs.append(str(d))
    raw = ablation.read_experiments(dirs[:2])
    assert raw["settings"] == {"lr": 1e-3} and sorted(raw["seeds"]) == ["0", "1"]
    assert raw["seeds"]["0"] == [{"strategy": "none", "status": "ok", "val": [[1, 1.0, 7.5]],
                                  "failures": [[1, 1.5, 2]], "rebuilds": [[1, 1.7, 2, "grad-avg"]]}]
    with pytest.raises(ValueError, match="lr"):
        ablation.read_experiments(dirs)
    with pytest.raises(ValueError, match="twice"):
        ablation.read_experiments([dirs[0], dirs[0]])


def test_write_produces_a_report_the_raw_file_reproduces(tmp_path: Any) -> None:
    seeds = {s: [run("none", BASE), run("checkfree", BASE, failures=[(10, 1)], rebuilds=[(10, 1)])]
             for s in range(3)}
    paths = ablation.write(str(tmp_path / "a"), raw_of(seeds))
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    with open(paths["raw"]) as f:
        again = ablation.write(str(tmp_path / "b"), json.load(f))
    assert open(paths["md"]).read() == open(again["md"]).read()
    assert "| checkfree | 3 |" in open(paths["md"]).read()
