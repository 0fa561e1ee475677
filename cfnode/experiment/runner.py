"""`cfnode experiment`: run recovery strategies on fresh local swarms under one seeded failure schedule and
write the comparison report (docs/experiments.md).

Each run is a `cfnode demo` swarm (bootstrap, stages 0..L, with `replicas` K > 1 a group of K members for
each transformer stage, spares; real processes on 127.0.0.1) started through `demo.run_demo`, with the
schedule's failures as `--kill STAGE@STEP` (one member) and `--kill-group STAGE@STEP` (a whole group);
swarmrun.py runs one swarm and reads its record back. The failure-free run (`none`) goes first: its mean step
time is the T of the failure model. Then, per failure level, every other strategy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from cfnode.config import ENGINES, PRESETS, GroupConfig
from cfnode.errors import ConfigError
from cfnode.experiment.report import RunRecord, write_report
from cfnode.experiment.resume import EXIT_INTERRUPTED, RunSpec, run_specs
from cfnode.experiment.schedule import (
    DEFAULT_MAX_PER_STEP,
    DEFAULT_MIN_GAP,
    STRATEGIES,
    FailureSchedule,
    at_risk_stages,
    expected_failures,
    expected_group_failures,
    generate_schedule,
    group_size,
    injects,
    level_label,
    step_probability,
)
from cfnode.experiment.swarmrun import EXIT_RUN_FAILED, mean_step_s
from cfnode.experiment.swarmrun import run_swarm as run_swarm_record

logger = logging.getLogger(__name__)

IMPLEMENTED = ("none", "checkfree", "checkfree+", "uniform-avg", "copy", "random", "checkpoint", "redundant")
REFERENCE_STEP_S = 90.0
"""Default c * T: one step of the local swarm stands for ~90 s, a step of the paper's 500M model (§3.4)."""
GROUP_STRATEGIES = ("none", "checkfree", "uniform-avg", "copy", "random")
"""Strategies that run with stage groups (K > 1). CheckFree+ replicas and the checkpoint and redundant
baselines copy to each group's lead only (docs/groups.md, "Not yet"), so they run with K = 1 only."""


@dataclass(frozen=True)
class StrategyPlan:
    """How a strategy maps onto `cfnode join` flags (through DemoOptions) and whether it injects failures."""

    name: str
    recovery: str = "checkfree"
    recovery_rule: str = "grad-avg"
    injects: bool = True


def strategy_plan(name: str) -> StrategyPlan:
    if name not in IMPLEMENTED:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if name in ("checkfree+", "checkpoint", "redundant"):
        return StrategyPlan(name, recovery=name)
    if name in ("uniform-avg", "copy", "random"):
        return StrategyPlan(name, recovery_rule=name)
    return StrategyPlan(name, injects=injects(name))


@dataclass(frozen=True)
class FailureLevel:
    rate: float | None
    """Hourly rate in percent (None when p was given directly)."""
    p: float

    @property
    def label(self) -> str:
        return level_label(self.rate, self.p)

    @property
    def slug(self) -> str:
        return f"{self.rate:g}pct" if self.rate is not None else f"p{self.p:g}"


def split_csv(text: str) -> tuple[str, ...]:
    """`a,b, c` -> ('a', 'b', 'c') (for the CLI's comma-separated lists)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """`5,10,16` -> (5.0, 10.0, 16.0); ConfigError naming the flag otherwise."""
    try:
        return tuple(float(x) for x in split_csv(text))
    except ValueError as e:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from e


@dataclass(frozen=True, kw_only=True)
class ExperimentOptions:
    strategies: tuple[str, ...] = ("none", "checkfree", "checkfree+")
    rates: tuple[float, ...] = (5.0, 10.0, 16.0)
    """Hourly failure rates of one stage, in percent."""
    probabilities: tuple[float, ...] = ()
    """Per-stage, per-step failure probabilities given directly (instead of `rates`)."""
    steps: int = 300
    out: str = "experiment"
    seed: int = 0
    preset_name: str = "small"
    stages: int = 4
    spares: int = 2
    """Spares started with the swarm. Two keep a warm spare ready while the one started after each rebuild boots
    (10-30 s on a loaded 2-core machine); with one, a failure soon after another waits for that boot."""
    microbatches: int = 4
    microbatch_size: int = 8
    lr: float = 1e-3
    val_every: int = 10
    heartbeat_period: float = 2.0
    heartbeat_ttl: float = 8.0
    compression: float | None = None
    """Time-compression factor c. None: c = reference_step_s / T, i.e. c * T = reference_step_s."""
    reference_step_s: float = REFERENCE_STEP_S
    step_time_s: float | None = None
    """T in seconds; None: measured (mean step time of the `none` run, or of a warm-up run)."""
    warmup_steps: int = 20
    min_gap: int = DEFAULT_MIN_GAP
    max_per_step: int = DEFAULT_MAX_PER_STEP
    target_val_loss: float | None = None
    replay: str | None = None
    """A schedules.json (or one schedule's JSON) from an earlier experiment: replay its failures."""
    checkpoint_every: int = 50
    """`checkpoint` strategy: every stage saves weights + Adam state every N steps (the paper's 10/50/100)."""
    replicas: int = 1
    """K: members of the group of every stage (`join --replicas K` on every node). Each member fails on its own;
    a stage is lost only when all K are (docs/experiments.md)."""
    device: str = "cpu"
    """`join --device` of every node of every run."""
    compute_dtype: str = "float32"
    """`join --compute-dtype` of every node of every run."""
    wire_dtype: str = "float32"
    """`join --wire-dtype` of every node of every run."""
    engine: str = "swarm"
    """`swarm`: every run a fresh swarm of processes on 127.0.0.1 (a `cfnode demo`); `local`: the same nodes in
    one process on virtual time (experiment/localrun.py), for loss curves at depth."""
    jobs: int = 1
    """Runs at once, each in its own process (local engine only; experiment/resume.py)."""

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ConfigError("--strategies needs at least one strategy")
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"--strategies lists a strategy twice: {', '.join(self.strategies)}")
        for name in self.strategies:
            strategy_plan(name)
        if "checkfree+" in self.strategies and self.stages < 4:
            raise ConfigError(f"strategy checkfree+ needs --stages >= 4, got {self.stages}")
        if self.rates and self.probabilities:
            raise ConfigError("give either --rates (hourly %) or --probabilities (per step), not both")
        if not self.rates and not self.probabilities and not self.replay:
            raise ConfigError("give --rates or --probabilities")
        for r in self.rates:
            if not 0 <= r <= 100:
                raise ConfigError(f"--rates are hourly percentages in 0..100, got {r}")
        for p in self.probabilities:
            if not 0 <= p <= 1:
                raise ConfigError(f"--probabilities must be in 0..1, got {p}")
        if self.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {self.steps}")
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset_name!r}")
        for name in ("compression", "step_time_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name.replace('_s', '').replace('_', '-')} must be > 0, got {value}")
        if not self.reference_step_s > 0:
            raise ConfigError(f"--reference-step-time must be > 0, got {self.reference_step_s}")
        if self.min_gap < 1 or self.max_per_step < 1 or self.warmup_steps < 2:
            raise ConfigError("--min-gap and --max-per-step must be >= 1, --warmup-steps >= 2")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.val_every < 1:
            raise ConfigError("--val-every must be >= 1: the report compares validation curves")
        if self.replay and not os.path.isfile(self.replay):
            raise ConfigError(f"--replay {self.replay}: no such file")
        GroupConfig(replicas=self.replicas)  # --replicas must be 1..16
        other = [s for s in self.strategies if s not in GROUP_STRATEGIES]
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")
        if self.jobs > 1 and self.engine != "local":
            raise ConfigError("--jobs > 1 needs --engine local: swarm runs measure time, and runs side by side "
                              "would slow each other down")
        if self.engine == "local" and self.replicas > 1:
            raise ConfigError("--engine local runs one node per stage: use --replicas 1 (or --engine swarm)")
        if self.engine == "local" and self.needs_measured_step_time():
            raise ConfigError("--engine local measures no step time (its clock is virtual): with --compression "
                              "give --step-time too, or --probabilities")
        if self.replicas > 1 and other:
            raise ConfigError(f"--replicas {self.replicas} runs only {', '.join(GROUP_STRATEGIES)}; "
                              f"{', '.join(other)} with stage groups is not built (docs/groups.md)")

    def needs_measured_step_time(self) -> bool:
        """T matters for p only with an explicit compression factor and no explicit T or probabilities."""
        return (self.compression is not None and self.step_time_s is None and not self.probabilities
                and not self.replay)


# -- pure decisions -------------------------------------------------------------------------------------------


def effective_compression(options: ExperimentOptions, step_s: float | None) -> float | None:
    """c as used (explicit) or implied (reference_step_s / T; None while T is unknown)."""
    if options.compression is not None:
        return options.compression
    return options.reference_step_s / step_s if step_s else None


def failure_levels(options: ExperimentOptions, step_s: float | None) -> list[FailureLevel]:
    """The per-step probability of each requested level: given directly, or p = 1 - (1 - h)^(c T / 3600)
    with c * T = reference_step_s (auto compression) or the explicit c and T."""
    if options.probabilities:
        return [FailureLevel(None, p) for p in options.probabilities]
    if options.compression is None:
        return [FailureLevel(r, step_probability(r, options.reference_step_s, 1.0)) for r in options.rates]
    t = options.step_time_s or step_s
    if not t:
        raise ConfigError("an explicit --compression needs the step time: pass --step-time or run 'none' first")
    return [FailureLevel(r, step_probability(r, t, options.compression)) for r in options.rates]


def load_schedules(path: str) -> list[FailureSchedule]:
    """A schedules.json written by an experiment ({"schedules": [...]}) or one schedule's JSON."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--replay {path} is not JSON: {e}") from e
    if isinstance(data, dict) and "schedules" in data:
        return [FailureSchedule.from_dict(d) for d in data["schedules"]]
    return [FailureSchedule.from_json(text)]


def plan_schedules(options: ExperimentOptions, levels: Sequence[FailureLevel], step_s: float | None,
                   replayed: Sequence[FailureSchedule] = ()) -> dict[tuple[str, tuple[int, ...]], FailureSchedule]:
    """One schedule per (level label, stages at risk) the requested strategies need, the failure-free run's
    included. Replayed schedules are used as they are; a replayed level that lacks a needed at-risk set is
    regenerated from the replayed parameters (same seed, p, gap), so it shares the replayed draws."""
    needed = sorted({at_risk_stages(s, options.stages) for s in options.strategies})
    compression = effective_compression(options, step_s)
    out: dict[tuple[str, tuple[int, ...]], FailureSchedule] = {}
    if replayed:
        for sched in replayed:
            if sched.num_stages != options.stages or sched.steps != options.steps:
                raise ConfigError(f"replayed schedule is for L={sched.num_stages}, {sched.steps} steps; this "
                                  f"experiment has L={options.stages}, {options.steps} steps")
            if sched.replicas != options.replicas:
                raise ConfigError(f"replayed schedule is for --replicas {sched.replicas}; this experiment has "
                                  f"--replicas {options.replicas}")
        for sched in replayed:
            out.setdefault((sched.label, sched.at_risk), sched)
        for sched in replayed:
            for at_risk in needed:
                if (sched.label, at_risk) not in out:
                    out[(sched.label, at_risk)] = generate_schedule(
                        seed=sched.seed, p=sched.p, steps=sched.steps, num_stages=sched.num_stages,
                        at_risk=at_risk, min_gap=sched.min_gap, max_per_step=sched.max_per_step,
                        replicas=sched.replicas, rate=sched.rate, step_s=sched.step_s,
                        compression=sched.compression)
        return out
    for level in levels:
        for at_risk in needed:
            out[(level.label, at_risk)] = generate_schedule(
                seed=options.seed, p=level.p, steps=options.steps, num_stages=options.stages, at_risk=at_risk,
                min_gap=options.min_gap, max_per_step=options.max_per_step, replicas=options.replicas,
                rate=level.rate, step_s=step_s, compression=compression)
    return out


def replayed_levels(schedules: Sequence[FailureSchedule]) -> list[FailureLevel]:
    return list(dict.fromkeys(FailureLevel(s.rate, s.p) for s in schedules))


def describe_events(schedule: FailureSchedule) -> str:
    """`2@8, 3@24` (stage@step) with one node per stage; with groups each entry says which: `m1@5` is a member
    of stage 1 killed at step 5, `g2@12` stage 2's whole group."""
    if schedule.replicas == 1:
        return ", ".join(f"{e.stage}@{e.step}" for e in schedule.events) or "none"
    return ", ".join(f"{e.kind[0]}{e.stage}@{e.step}" for e in schedule.events) or "none"


def expected_per_run(schedule: FailureSchedule) -> float | dict[str, float]:
    """The expected number of failures the schedule's parameters give (one node per stage), or of member kills
    and stage losses (groups); see schedule.expected_failures and expected_group_failures."""
    s = schedule
    if s.replicas == 1:
        return round(expected_failures(s.p, s.steps, len(s.at_risk), s.max_per_step, s.min_gap), 2)
    members, losses = expected_group_failures(s.p, s.steps, [group_size(st, s.replicas) for st in s.at_risk],
                                              s.max_per_step, s.min_gap)
    return {"member kills": round(members, 2), "stage losses": round(losses, 4)}


# -- orchestration --------------------------------------------------------------------------------------------


def _write_schedules(path: str, options: ExperimentOptions,
                     schedules: dict[tuple[str, tuple[int, ...]], FailureSchedule]) -> None:
    payload = {"format": 1, "seed": options.seed,
               "schedules": [s.to_dict() for s in schedules.values()]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def run_experiment(options: ExperimentOptions) -> int:
    """Run every strategy, write schedules.json and the report into options.out; 0 if every run completed,
    1 if some did not (the report says which), 130 if interrupted (a partial report is written)."""
    os.makedirs(options.out, exist_ok=True)
    plans = [strategy_plan(s) for s in options.strategies]
    replayed = load_schedules(options.replay) if options.replay else []
    known_levels = replayed_levels(replayed) if replayed else None
    if replayed:  # a schedule file that does not fit fails now, not after the first run
        plan_schedules(options, known_levels or [], None, replayed)
    failing = [p for p in plans if p.injects]
    n_levels = len(known_levels) if known_levels is not None else len(options.probabilities or options.rates)
    baseline_runs = 1 if len(failing) < len(plans) or options.needs_measured_step_time() else 0
    total = baseline_runs + len(failing) * n_levels
    runs: list[RunRecord] = []
    step_s = options.step_time_s
    measured: float | None = None
    warmup: RunRecord | None = None
    schedules: dict[tuple[str, tuple[int, ...]], FailureSchedule] = {}
    started = time.time()
    timed = options.engine == "swarm"  # the local engine's clock is virtual: its step times mean nothing
    bar = tqdm(total=total, desc="experiment", unit="run", dynamic_ncols=True)
    code = 0

    def done(spec: RunSpec, run: RunRecord) -> None:
        bar.set_postfix_str(spec.name)
        bar.update(1)

    try:
        if any(not p.injects for p in plans):
            bar.set_postfix_str("none")
            [run] = run_specs(options, [RunSpec("none", None, None, options.steps, "none")], done)
            runs.append(run)
            measured = mean_step_s(run) if timed else None
            if run.exit_code == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED
        elif options.needs_measured_step_time():
            bar.set_postfix_str("warm-up")
            # only the swarm engine measures step times (ExperimentOptions refuses the local one here)
            warmup = run_swarm_record(options, strategy_plan("none"), None, None, options.warmup_steps, "warmup")
            measured = mean_step_s(warmup)
            bar.update(1)
            if warmup.exit_code == EXIT_INTERRUPTED:
                return EXIT_INTERRUPTED
        step_s = step_s or measured
        try:
            levels = known_levels if known_levels is not None else failure_levels(options, step_s)
        except ConfigError as e:
            logger.error("cannot compute the failure probabilities: %s (the step-time run did not complete)", e)
            return EXIT_RUN_FAILED
        schedules = plan_schedules(options, levels, step_s, replayed)
        _write_schedules(os.path.join(options.out, "schedules.json"), options, schedules)
        specs = []
        for level in levels:
            for plan in failing:
                sched = schedules[(level.label, at_risk_stages(plan.name, options.stages))]
                logger.info("%s at %s: p=%.5f per node and step, %d member(s) per stage, stages %s at risk, "
                            "failures at %s", plan.name, level.label, level.p, sched.replicas, list(sched.at_risk),
                            describe_events(sched))
                specs.append(RunSpec(plan.name, level, sched, options.steps, f"{plan.name}-{level.slug}"))
        failed = run_specs(options, specs, done)
        runs.extend(failed)
        if any(r.exit_code == EXIT_INTERRUPTED for r in failed):
            return EXIT_INTERRUPTED
        code = 0 if all(r.status == "ok" for r in runs) else EXIT_RUN_FAILED
        return code
    finally:
        bar.close()
        if runs:
            meta = _meta(options, schedules, step_s, measured, warmup, started)
            for run in runs:
                if run.strategy == "none":
                    run.meta["recorded_schedules"] = [s.to_dict() for (_, at_risk), s in schedules.items()
                                                      if at_risk == at_risk_stages("none", options.stages)]
            write_report(options.out, runs, target=options.target_val_loss, meta=meta,
                         schedules=[s.to_dict() for s in schedules.values()])
            if code:
                logger.warning("some runs did not complete: see %s", os.path.join(options.out, "results.md"))


def _meta(options: ExperimentOptions, schedules: dict[tuple[str, tuple[int, ...]], FailureSchedule], step_s: float | None,
          measured: float | None, warmup: RunRecord | None, started: float) -> dict[str, Any]:
    c = effective_compression(options, step_s)
    levels = dict.fromkeys((s.label, s.p) for s in schedules.values())
    expected = {f"{label}, stages {list(at_risk)}": expected_per_run(s) for (label, at_risk), s in schedules.items()}
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "strategies": ", ".join(options.strategies),
        "preset": options.preset_name, "stages (L)": options.stages, "steps": options.steps, "seed": options.seed,
        "tokens per step": options.microbatches * options.microbatch_size * PRESETS[options.preset_name].seq_len,
        "heartbeat period / ttl (s)": f"{options.heartbeat_period} / {options.heartbeat_ttl}",
        "step time T (s)": None if step_s is None else round(step_s, 4),
        "T source": "given" if options.step_time_s else ("measured (mean step_s of the "
                                                         f"{'warm-up' if warmup else 'none'} run)"
                                                         if measured else "unknown"),
        "time compression c": None if c is None else round(c, 2),
        "compression source": _compression_source(options),
        "per-step failure probability p": ", ".join(f"{label}: {p:.5f}" for label, p in levels) or None,
        "members per stage 1..L (K)": options.replicas,
        "min gap (steps) / max failures per step": f"{options.min_gap} / {options.max_per_step}",
        "expected failures per run": expected,
        "replayed from": options.replay,
        "options": asdict(options),
    }


def _compression_source(options: ExperimentOptions) -> str:
    if options.replay:
        return "not used: schedules replayed"
    if options.probabilities:
        return "not used: per-step probabilities given directly"
    if options.compression is not None:
        return "given"
    return f"auto: c * T = {options.reference_step_s:g} s (one step stands for {options.reference_step_s:g} s)"
