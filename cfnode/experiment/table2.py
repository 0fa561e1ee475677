"""Table 2 with measured costs (docs/experiments.md, "Table 2"): the time model of `timemodel.py` fed with the
local engine's loss curves at the paper's per-iteration failure probabilities and with what each strategy cost
on a real loopback swarm of the same model.

From the swarm (`cfnode experiment --engine swarm`, one run per strategy, real kills):

* the base step time t: the median `step_s` of plain CheckFree;
* `step_factor`: a strategy's median step time over t (checkpointing: on the steps without a save);
* `save_steps`: checkpointing's extra time on a step that saves, over t;
* the downtime per failure d (kill to the first step committed after the rebuild or restore), in seconds.

Scaling to the modelled step time T (the paper's 500M model, ~90 s a step): what grows with the model (a
step, a save, the retried step) keeps its ratio to the step time; the rest of a downtime (detection by the
heartbeat ttl, the spare's claim, the fetch and rebuild on loopback) is kept in seconds, so
`downtime_steps = (d - factor * t) / T + factor`. A checkpointing swarm also redoes half an interval per
failure on average (`StrategyCosts.lost_steps`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from cfnode.experiment.report import DEFAULT_TARGET_MARGIN, RunRecord, default_target, downtimes, val_points
from cfnode.experiment.timemodel import (
    PAPER_RATES_PCT,
    StrategyCosts,
    paper_ratios,
    ratios,
    steps_to_target,
    table2,
)

PAPER_P = {5.0: 0.0009, 10.0: 0.002, 16.0: 0.004}
"""The paper's per-iteration stage-failure probabilities for its 5, 10 and 16 %/h convergence runs."""
CHECKPOINT_INTERVALS = (10, 50, 100)
BASE = "checkfree"


def _median_step_s(run: RunRecord, skip: Collection[int] = ()) -> float:
    xs = [float(s["step_s"]) for s in run.steps[1:] if s.get("step_s") and int(s["step"]) not in skip]
    if not xs:
        raise ValueError(f"run {run.strategy} has no timed steps")
    return statistics.median(xs)


def measured(runs: Sequence[RunRecord], checkpoint_every: int) -> dict[str, Any]:
    """`base_step_s` and, under `strategies`, per strategy of the swarm experiment: step_s (median),
    step_factor, downtime_s (mean over failures, None without one), failures, and for checkpointing
    save_extra_s (mean extra time of a saving step)."""
    by_name = {r.strategy: r for r in runs}
    if BASE not in by_name:
        raise ValueError(f"the swarm experiment has no {BASE} run")
    base = _median_step_s(by_name[BASE])
    out: dict[str, dict[str, Any]] = {}
    for name, run in by_name.items():
        saves = {int(s["step"]) for s in run.steps if checkpoint_every and int(s["step"]) % checkpoint_every == 0} \
            if name == "checkpoint" else set()
        step_s = _median_step_s(run, saves)
        row: dict[str, Any] = {"step_s": step_s, "step_factor": step_s / base}
        down = [d for d in downtimes(run) if d is not None]
        row["failures"], row["downtime_s"] = len(down), (statistics.fmean(down) if down else None)
        if saves:
            extra = [float(s["step_s"]) - step_s for s in run.steps if int(s["step"]) in saves and s.get("step_s")]
            row["save_extra_s"] = max(0.0, statistics.fmean(extra)) if extra else 0.0
        out[name] = row
    return {"base_step_s": base, "strategies": out}


def model_costs(measured_: Mapping[str, Any], *, model_step_s: float,
                intervals: Sequence[int] = CHECKPOINT_INTERVALS) -> dict[str, StrategyCosts]:
    """StrategyCosts at the modelled step time (see the module's docstring). Checkpointing gets one entry per
    interval, `checkpoint/N`, all with the save and restore measured at the swarm's interval."""
    base, figures = measured_["base_step_s"], measured_["strategies"]

    def downtime_steps(row: Mapping[str, Any]) -> float:
        d = row.get("downtime_s")
        if d is None:
            raise ValueError("a strategy with failures needs a measured downtime")
        return max(0.0, d - row["step_factor"] * base) / model_step_s + row["step_factor"]

    out = {name: StrategyCosts(step_factor=figures[name]["step_factor"], downtime_steps=downtime_steps(figures[name]))
           for name in ("checkfree", "checkfree+", "redundant") if name in figures}
    if "checkpoint" in figures:
        row = figures["checkpoint"]
        for n in intervals:
            out[f"checkpoint/{n}"] = StrategyCosts(step_factor=row["step_factor"], downtime_steps=downtime_steps(row),
                                                   save_steps=row.get("save_extra_s", 0.0) / base, checkpoint_every=n)
    return out


def curve(run: RunRecord) -> list[tuple[int, float]]:
    return [(step, v) for _, step, v in val_points(run)]


def steps_needed(curves: Mapping[str, Mapping[float, Sequence[RunRecord]]], failure_free: Sequence[RunRecord],
                 target: float, names: Sequence[str]) -> dict[str, dict[float, float | None]]:
    """Steps each strategy's loss curve needs per rate: CheckFree and CheckFree+ from their own runs at the
    paper's p (mean over the seeds given; None if any seed misses the target); checkpointing and redundant
    computation lose nothing a rollback or the shadow does not restore exactly, so they follow the failure-free
    curves (their time costs are in the model): the mean over the seeds' failure-free runs."""
    def mean_steps(runs: Sequence[RunRecord]) -> float | None:
        got = [steps_to_target(curve(r), target) for r in runs]
        return None if not got or None in got else statistics.fmean(got)

    free = mean_steps(failure_free)
    return {name: {rate: mean_steps(curves[name].get(rate, ())) if name in curves else free
                   for rate in PAPER_RATES_PCT}
            for name in names}


def build(curves: Mapping[str, Mapping[float, Sequence[RunRecord]]], failure_free: Sequence[RunRecord],
          swarm_runs: Sequence[RunRecord], *, swarm_checkpoint_every: int, model_step_s: float, nodes: int,
          target: float | None = None, margin: float = DEFAULT_TARGET_MARGIN) -> dict[str, Any]:
    """Everything Table 2 needs: measured figures, modelled costs, steps and hours to the target, ratios to
    checkpointing every 50 steps (the paper's middle interval) and the paper's ratios. The first failure-free
    run sets the default target."""
    if target is None:
        target = default_target(failure_free[:1], margin)
        if target is None:
            raise ValueError("the failure-free run has no validation loss to set a target from")
    figures = measured(swarm_runs, swarm_checkpoint_every)
    costs = model_costs(figures, model_step_s=model_step_s)
    steps = steps_needed(curves, failure_free, target, list(costs))
    hours = table2(steps, costs, step_s=model_step_s, nodes=nodes)
    ours = ratios(hours, reference="checkpoint/50")
    paper = paper_ratios()
    return {"target": target, "model_step_s": model_step_s, "nodes": nodes, "figures": figures,
            "costs": {k: {**asdict(v), "lost_steps": v.lost_steps} for k, v in costs.items()},
            "steps": steps, "hours": hours, "ratios": ours, "paper_ratios": paper}


def read(curve_dirs: Sequence[str], costs_dir: str, *, model_step_s: float, nodes: int | None = None,
         target: float | None = None) -> dict[str, Any]:
    """`build` from experiment outputs: `curve_dirs` of `--engine local` runs of none, checkfree and checkfree+
    at the paper's --probabilities (one directory per seed), `costs_dir` of one `--engine swarm` experiment of
    checkfree, checkfree+, checkpoint and redundant on the same model."""
    import json
    import os

    def load(d: str) -> dict[str, Any]:
        with open(os.path.join(d, "results.json"), encoding="utf-8") as f:
            return json.load(f)

    rate_of = {p: rate for rate, p in PAPER_P.items()}
    curves: dict[str, dict[float, list[RunRecord]]] = {}
    free: list[RunRecord] = []
    for d in curve_dirs:
        for data in load(d)["runs"]:
            run = RunRecord.from_dict(data)
            if run.strategy == "none":
                free.append(run)  # the first directory's sets the target
            elif run.p in rate_of:
                curves.setdefault(run.strategy, {}).setdefault(rate_of[run.p], []).append(run)
    if not free:
        raise ValueError(f"no failure-free run in {', '.join(curve_dirs)}")
    costs = load(costs_dir)
    options = costs["meta"]["options"]
    t = build(curves, free, [RunRecord.from_dict(r) for r in costs["runs"]],
              swarm_checkpoint_every=int(options["checkpoint_every"]), model_step_s=model_step_s,
              nodes=nodes if nodes is not None else int(options["stages"]) + 1, target=target)
    return {**t, "sources": {"curves": list(curve_dirs), "costs": costs_dir}}


def _f(x: float | None, fmt: str) -> str:
    return "not reached" if x is None else ("∞" if not math.isfinite(x) else f"{x:{fmt}}")


def markdown(t: Mapping[str, Any]) -> str:
    rates = PAPER_RATES_PCT
    head = " / ".join(f"{r:g} %/h" for r in rates)
    lines = [f"Hours to validation loss {t['target']:.4f} (modelled step {t['model_step_s']:g} s, "
             f"{t['nodes']} nodes at risk), and the ratio to checkpointing every 50 steps; the paper's ratio "
             "(its Table 2, checkpointing's interval as it reports it) beside ours.", "",
             f"| strategy | steps ({head}) | hours ({head}) | ratio ({head}) | paper's ratio ({head}) |",
             "|---|---|---|---|---|"]
    paper_name = {"checkfree": "checkfree", "checkfree+": "checkfree+", "redundant": "redundant",
                  "checkpoint/50": "checkpoint"}
    for name, by_rate in t["hours"].items():
        steps = " / ".join(_f(t["steps"][name][r], ".0f") for r in rates)
        hours = " / ".join(_f(by_rate[r], ".1f") for r in rates)
        ratio = " / ".join(_f(t["ratios"][name][r], ".2f") for r in rates)
        p = t["paper_ratios"].get(paper_name.get(name, ""), None)
        paper = " / ".join(f"{p[r]:.2f}" for r in rates) if p else "–"
        lines.append(f"| {name} | {steps} | {hours} | {ratio} | {paper} |")
    lines += ["", "Measured on the real swarm:", "",
              "| strategy | median step (s) | × CheckFree's | downtime per failure (s, failures) | extra per save (s) |",
              "|---|---:|---:|---:|---:|"]
    for name, row in t["figures"]["strategies"].items():
        down = "–" if row.get("downtime_s") is None else f"{row['downtime_s']:.2f} ({row['failures']})"
        save = f"{row['save_extra_s']:.4f}" if "save_extra_s" in row else "–"
        lines.append(f"| {name} | {row['step_s']:.4f} | {row['step_factor']:.3f} | {down} | {save} |")
    lines += ["", "Modelled costs (units of one modelled step):", "",
              "| strategy | step factor | downtime per failure | save | checkpoint every | lost per failure |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, c in t["costs"].items():
        lines.append(f"| {name} | {c['step_factor']:.3f} | {c['downtime_steps']:.3f} | {c['save_steps']:.4f} | "
                     f"{c['checkpoint_every'] or '–'} | {c['lost_steps']:g} |")
    return "\n".join(lines) + "\n"
