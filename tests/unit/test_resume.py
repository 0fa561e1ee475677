"""Resumable experiments (cfnode/experiment/resume.py): one result file per run, reused only when the settings
that decide the run match, and `--jobs` running several at once: on real local-engine runs."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from cfnode.errors import ConfigError
from cfnode.experiment.report import RunRecord
from cfnode.experiment.resume import RunSpec, load_record, record_path, run_key, save_record
from cfnode.experiment.runner import ExperimentOptions, FailureLevel, run_experiment
from cfnode.experiment.schedule import generate_schedule


def options(tmp_path, **kw) -> ExperimentOptions:
    base = dict(engine="local", preset_name="tiny", stages=2, strategies=("none", "checkfree", "copy"),
                rates=(), probabilities=(0.05,), steps=12, val_every=4, microbatches=2, microbatch_size=2,
                heartbeat_period=1.0, heartbeat_ttl=3.0, out=str(tmp_path / "exp"))
    return ExperimentOptions(**{**base, **kw})


def spec(steps: int = 12, seed: int = 0) -> RunSpec:
    sched = generate_schedule(seed=seed, p=0.05, steps=steps, num_stages=2, at_risk=[1, 2])
    return RunSpec("checkfree", FailureLevel(None, 0.05), sched, steps, "checkfree-p0.05")


def test_the_key_covers_what_decides_a_run_and_nothing_else(tmp_path) -> None:
    o = options(tmp_path)
    key = run_key(o, spec())
    assert run_key(dataclasses.replace(o, out="elsewhere", jobs=2), spec()) == key
    assert run_key(dataclasses.replace(o, lr=2e-3), spec()) != key
    assert run_key(o, spec(steps=13)) != key
    assert run_key(o, dataclasses.replace(spec(), strategy="copy")) != key


def test_a_result_file_is_reused_only_under_its_own_key(tmp_path) -> None:
    out = str(tmp_path)
    run = RunRecord(strategy="checkfree", steps=[{"step": 1, "time_s": 0.5, "loss": 8.0}], planned_steps=1)
    save_record(out, "r", "k1", run)
    assert load_record(out, "r", "k1").to_dict() == run.to_dict()
    assert load_record(out, "r", "k2") is None
    assert load_record(out, "other", "k1") is None
    with open(record_path(out, "r"), "w", encoding="utf-8") as f:
        f.write("{not json")
    assert load_record(out, "r", "k1") is None


def test_jobs_need_the_local_engine() -> None:
    with pytest.raises(ConfigError, match="--jobs > 1 needs --engine local"):
        ExperimentOptions(engine="swarm", jobs=2, rates=(), probabilities=(0.01,))
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        ExperimentOptions(engine="local", jobs=0, rates=(), probabilities=(0.01,))


def _records(out: str) -> dict[str, dict]:
    got = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        with open(record_path(out, name), encoding="utf-8") as f:
            got[name] = json.load(f)
    return got


@pytest.mark.slow  # ~17 s: three local runs and two spawned workers; the default run is near its 15 minutes
def test_an_experiment_run_again_reuses_its_runs_and_redoes_changed_ones(tmp_path) -> None:
    o = options(tmp_path, jobs=2)  # the two failing runs at once, in two processes
    assert run_experiment(o) == 0
    first = _records(o.out)
    assert sorted(first) == ["checkfree-p0.05", "copy-p0.05", "none"]
    assert all(r["record"]["status"] == "ok" for r in first.values())

    assert run_experiment(dataclasses.replace(o, jobs=1)) == 0  # nothing to do: every record matches
    again = _records(o.out)
    assert again == first
    with open(os.path.join(o.out, "results.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert all(r["meta"].get("reused") for r in report["runs"]), [r["meta"] for r in report["runs"]]

    os.remove(record_path(o.out, "copy-p0.05"))  # as if interrupted during that run
    assert run_experiment(o) == 0
    redone = _records(o.out)
    assert redone["none"] == first["none"] and redone["checkfree-p0.05"] == first["checkfree-p0.05"]
    assert redone["copy-p0.05"]["key"] == first["copy-p0.05"]["key"]
    # same seed and schedule: the redone run computes the same losses
    assert [s["loss"] for s in redone["copy-p0.05"]["record"]["steps"]] == \
        [s["loss"] for s in first["copy-p0.05"]["record"]["steps"]]
