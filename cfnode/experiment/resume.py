"""Resumable experiments: every run leaves one result file, OUT/runs/NAME/record.json, keyed by everything that
decides what the run computes (the experiment's options, the strategy, the failure level, the schedule and the
steps). Running the same experiment into the same OUT again reuses each run whose key matches and runs only
the others; `--jobs N` runs up to N of them at once, each in its own process (local engine only: swarm runs
measure time, which runs side by side would distort)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from cfnode.experiment.report import RunRecord

if TYPE_CHECKING:
    from cfnode.experiment.runner import ExperimentOptions, FailureLevel
    from cfnode.experiment.schedule import FailureSchedule

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
UNKEYED = ("out", "jobs")
"""Options that do not change what a run computes."""
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: a strategy at a failure level (None: failure-free) under a schedule."""

    strategy: str
    level: FailureLevel | None
    schedule: FailureSchedule | None
    steps: int
    name: str


def run_key(options: ExperimentOptions, spec: RunSpec) -> str:
    """A digest of everything that decides what `spec` computes under `options`."""
    settings = {k: v for k, v in asdict(options).items() if k not in UNKEYED}
    payload = {"options": settings, "strategy": spec.strategy, "steps": spec.steps, "name": spec.name,
               "level": asdict(spec.level) if spec.level is not None else None,
               "schedule": spec.schedule.to_dict() if spec.schedule is not None else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def record_path(out: str, name: str) -> str:
    return os.path.join(out, "runs", name, RECORD_FILE)


def load_record(out: str, name: str, key: str) -> RunRecord | None:
    """The run's earlier result if it was computed with the same key (None: none, another key, or unreadable)."""
    path = record_path(out, name)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s (%s): the run is done again", path, e)
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("record"), dict):
        logger.info("%s was computed with other settings: the run is done again", path)
        return None
    return RunRecord.from_dict(data["record"])


def save_record(out: str, name: str, key: str, run: RunRecord) -> None:
    """Write the run's result next to its logs, atomically (an interrupted write leaves no half file)."""
    path = record_path(out, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key": key, "record": run.to_dict()}, f, default=str)
    os.replace(tmp, path)


def execute(options: ExperimentOptions, spec: RunSpec) -> RunRecord:
    """Run `spec` now (in this process) with the options' engine, and keep its result unless interrupted."""
    from cfnode.experiment.localrun import run_local_record
    from cfnode.experiment.runner import strategy_plan
    from cfnode.experiment.swarmrun import run_swarm

    run_one = run_local_record if options.engine == "local" else run_swarm
    run = run_one(options, strategy_plan(spec.strategy), spec.level, spec.schedule, spec.steps, spec.name)
    if spec.schedule is not None:
        run.meta["schedule"] = spec.schedule.to_dict()
    if run.exit_code != EXIT_INTERRUPTED:
        save_record(options.out, spec.name, run_key(options, spec), run)
    return run


def run_specs(options: ExperimentOptions, specs: Sequence[RunSpec],
              done: Callable[[RunSpec, RunRecord], None] = lambda spec, run: None) -> list[RunRecord]:
    """Every spec's record, in order: reused where its result file matches, else run (up to `options.jobs` at
    once). `done` sees each as it completes. Sequentially, an interrupted run ends the list there."""
    runs: dict[int, RunRecord] = {}
    todo: list[int] = []
    for i, spec in enumerate(specs):
        kept = load_record(options.out, spec.name, run_key(options, spec))
        if kept is not None:
            logger.info("run %s: reusing %s", spec.name, record_path(options.out, spec.name))
            kept.meta["reused"] = True
            runs[i] = kept
            done(spec, kept)
        else:
            todo.append(i)
    if options.jobs <= 1 or len(todo) <= 1:
        for i in todo:
            runs[i] = execute(options, specs[i])
            done(specs[i], runs[i])
            if runs[i].exit_code == EXIT_INTERRUPTED:
                break
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch or event-loop state in the workers
        with ProcessPoolExecutor(max_workers=min(options.jobs, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(execute, options, specs[i]): i for i in todo}
            for future in as_completed(futures):
                i = futures[future]
                runs[i] = future.result()
                done(specs[i], runs[i])
    return [runs[i] for i in sorted(runs)]

