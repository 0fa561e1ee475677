"""One run of `cfnode experiment`: a schedule as `cfnode demo` kill flags, one fresh swarm through
`demo.run_demo` (which starts the groups and spares, does the kills and refills the groups), and the report's
record of it from every node's event file and the demo's kill log.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cfnode.errors import CfnodeError
from cfnode.experiment.report import RunRecord
from cfnode.experiment.schedule import MEMBER, FailureSchedule

if TYPE_CHECKING:
    from cfnode.demo import DemoOptions
    from cfnode.experiment.runner import ExperimentOptions, FailureLevel, StrategyPlan

logger = logging.getLogger(__name__)

EXIT_RUN_FAILED = 1


class KillArgs(NamedTuple):
    """A schedule as `cfnode demo` values: `--kill STAGE@STEP` (one member of a group; with one node per stage
    its holder, i.e. the stage) and `--kill-group STAGE@STEP` (every member of the group)."""

    kill: tuple[str, ...]
    kill_group: tuple[str, ...]


def kill_args(schedule: FailureSchedule) -> KillArgs:
    """Member kills become `--kill`, stage losses `--kill-group`; with one node per stage (K = 1) every stage
    loss is a `--kill`, as before groups."""
    if schedule.replicas == 1:
        return KillArgs(tuple(f"{e.stage}@{e.step}" for e in schedule.events), ())
    return KillArgs(tuple(f"{e.stage}@{e.step}" for e in schedule.events if e.kind == MEMBER),
                    tuple(f"{e.stage}@{e.step}" for e in schedule.events if e.kind != MEMBER))


def mean_step_s(run: RunRecord) -> float | None:
    """Mean `step_s` of a run's committed steps, the first (warm-up) step excluded when there are others."""
    times = [s["step_s"] for s in run.steps if s.get("step_s") is not None]
    if len(times) > 1:
        times = times[1:]
    return sum(times) / len(times) if times else None


def run_record(*, strategy: str, level: FailureLevel | None, events: Sequence[dict[str, Any]],
               kills: Sequence[dict[str, Any]], planned_steps: int, exit_code: int,
               meta: dict[str, Any] | None = None) -> RunRecord:
    """A report record from the events of every node of one swarm run and the kills the demo made.

    Time 0 is the first `training_started` (stage 0's driver starts); steps are stage 0's `step` events in time
    order (a rebuilt stage 0 continues the numbering); failures are the kills (`loss` "member": one member of a
    group, which carried on; "stage": the whole group, or the one holder), recoveries the `recovery_finished`
    events (CheckFree or the strategy's rebuild), joins the `joined_group` events (a newcomer became an exact
    copy of a live member: never a rebuild)."""
    started = [e["ts"] for e in events if e.get("event") == "training_started"]
    step_events = sorted((e for e in events if e.get("event") == "step"), key=lambda e: e.get("time", e["ts"]))
    if started:
        t0 = min(started)
    elif step_events:
        t0 = step_events[0].get("time", step_events[0]["ts"]) - (step_events[0].get("step_s") or 0.0)
    else:
        t0 = min((e["ts"] for e in events), default=0.0)
    steps = [{"step": e["step"], "time_s": round(e.get("time", e["ts"]) - t0, 4), "loss": e.get("loss"),
              "val_loss": e.get("val_loss"), "step_s": e.get("step_s")} for e in step_events]
    out: list[dict[str, Any]] = []
    for k in kills:
        out.append({"kind": "failure", "stage": k["stage"], "planned_step": k.get("at_step"),
                    "step": k.get("killed_at_step"), "time_s": round(k["ts"] - t0, 4), "node": k.get("node"),
                    "loss": "member" if k.get("member_loss") else "stage",
                    "nodes": list(k.get("nodes") or [k.get("node")])})
    for e in events:
        if e.get("event") == "recovery_finished":
            out.append({"kind": "recovery", "stage": e.get("stage"), "step": e.get("step"),
                        "time_s": round(e["ts"] - t0, 4), "duration_s": e.get("duration_s"),
                        "fetch_s": e.get("fetch_s"), "how": e.get("how"), "rule": e.get("rule"),
                        "degraded": e.get("degraded"), "node": e.get("node")})
        elif e.get("event") == "recovery_failed":
            out.append({"kind": "recovery_failed", "stage": e.get("stage"), "time_s": round(e["ts"] - t0, 4),
                        "error": e.get("error"), "node": e.get("node")})
        elif e.get("event") == "joined_group":
            out.append({"kind": "join", "stage": e.get("stage"), "step": e.get("step"),
                        "time_s": round(e["ts"] - t0, 4), "duration_s": e.get("duration_s"),
                        "source": e.get("source"), "node": e.get("node")})
        elif e.get("event") == "rollback":  # the checkpoint baseline: the whole swarm went back
            out.append({"kind": "rollback", "step": e.get("to_step"), "from_step": e.get("from_step"),
                        "steps_lost": e.get("steps_lost"), "duration_s": e.get("restore_s"),
                        "time_s": round(e["ts"] - t0, 4), "node": e.get("node")})
    out.sort(key=lambda e: e["time_s"])
    aborted = sum(1 for e in events if e.get("event") == "step_aborted")
    extra: dict[str, Any] = {}
    saves = [e["save_s"] for e in events if e.get("event") == "checkpoint_saved"]
    if saves:
        extra = {"checkpoint_saves": len(saves), "checkpoint_save_s_total": round(sum(saves), 4)}
    timed_out = sum(1 for e in events if e.get("event") == "member_admission_timed_out")
    if timed_out:
        extra["member_admissions_timed_out"] = timed_out
    return RunRecord(strategy=strategy, level=level.label if level else None, rate=level.rate if level else None,
                     p=level.p if level else None, steps=steps, events=out, planned_steps=planned_steps,
                     exit_code=exit_code, meta={"steps_aborted": aborted, **(meta or {}), **extra})


def collect_events(workdir: str) -> list[dict[str, Any]]:
    """Every node's events of one run, each tagged with its node's name (the event file's stem)."""
    from cfnode.localswarm import read_events

    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "*.events.jsonl"))):
        node = os.path.basename(path).removesuffix(".events.jsonl")
        out.extend({**e, "node": node} for e in read_events(path))
    return out


def fresh_workdir(options: ExperimentOptions, name: str) -> str:
    """OUT/runs/NAME, emptied: a run always starts from nothing."""
    workdir = os.path.join(options.out, "runs", name)
    if os.path.exists(workdir):
        logger.info("removing the previous run's directory %s", workdir)
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    return workdir


def demo_options(options: ExperimentOptions, plan: StrategyPlan, steps: int, workdir: str, kills: KillArgs, *,
                 json_summary: str | None = None) -> DemoOptions:
    """The `cfnode demo` a run of the swarm engine is; the local engine gives its nodes the same join flags."""
    from cfnode.demo import DemoOptions

    return DemoOptions(stages=options.stages, steps=steps, preset_name=options.preset_name, workdir=workdir,
                       json_summary=json_summary, spares=max(options.spares, options.max_per_step),
                       microbatches=options.microbatches, microbatch_size=options.microbatch_size, lr=options.lr,
                       val_every=options.val_every, heartbeat_period=options.heartbeat_period,
                       heartbeat_ttl=options.heartbeat_ttl, kill=kills.kill, kill_group=kills.kill_group,
                       replicas=options.replicas, recovery_rule=plan.recovery_rule, recovery=plan.recovery,
                       checkpoint_every=options.checkpoint_every, device=options.device,
                       compute_dtype=options.compute_dtype, wire_dtype=options.wire_dtype,
                       seed=options.seed)


def run_swarm(options: ExperimentOptions, plan: StrategyPlan, level: FailureLevel | None,
              schedule: FailureSchedule | None, steps: int, name: str) -> RunRecord:
    """One fresh swarm (a `cfnode demo` run, K members per transformer stage) for one strategy; returns its
    record (exit code 130 on Ctrl-C)."""
    from cfnode.demo import run_demo

    workdir = fresh_workdir(options, name)
    kills = kill_args(schedule) if schedule is not None and plan.injects else KillArgs((), ())
    summary_path = os.path.join(workdir, "summary.json")
    demo = demo_options(options, plan, steps, workdir, kills, json_summary=summary_path)
    planned = [*(f"--kill {k}" for k in kills.kill), *(f"--kill-group {k}" for k in kills.kill_group)]
    logger.info("run %s: %d steps, %d member(s) per stage 1..%d%s; logs in %s", name, steps, options.replicas,
                options.stages, f", {' '.join(planned)}" if planned else ", no failures injected", workdir)
    error = None
    try:
        code = run_demo(demo)
    except (RuntimeError, TimeoutError, OSError, CfnodeError) as e:  # the swarm did not start
        logger.error("run %s failed: %s", name, e)
        code, error = EXIT_RUN_FAILED, str(e)
    kills_done: list[dict[str, Any]] = []
    if os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            kills_done = json.load(f).get("kills", [])
    meta: dict[str, Any] = {"workdir": workdir, "replicas": options.replicas, "kills_planned": list(kills.kill),
                            "kill_groups_planned": list(kills.kill_group)}
    if error:
        meta["error"] = error
    return run_record(strategy=plan.name, level=level, events=collect_events(workdir), kills=kills_done,
                      planned_steps=steps, exit_code=code, meta=meta)
