"""`cfnode experiment --engine local`: a run's swarm in ONE process, on one virtual-time event loop, over the
in-memory DHT and transport of the protocol harness (cfnode/testing), with no injected network faults.

Every node is a real `cfnode.node.Node` built from the same `cfnode join` flags a swarm node gets
(`cli.join_config_from_argv`), so the same `StageWorker`, data order, routes (CheckFree+ swaps), failure
detection, planner, recovery rules, partner copies, stage-0 replicas and fresh Adam at `lr x lr_scale` run; only
the processes, sockets and wall clock are gone. A kill is the harness's kill -9 (every I/O of the victim fails at
once), made at the instant stage 0 logs the step after which the schedule puts it, so the step in flight is
the next one, as in a swarm whose victim dies holding a microbatch of it (`join --debug-kill-mid-step`). Compute
runs inline and costs no virtual time: a run's `time_s` are virtual seconds of the protocol (heartbeats, ttls,
timeouts), not a measure of speed: costs in time must be measured on real swarms.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cfnode.config import NodeConfig
from cfnode.errors import EXIT_UNRECOVERABLE

if TYPE_CHECKING:
    from cfnode.experiment.report import RunRecord
    from cfnode.experiment.runner import ExperimentOptions, FailureLevel, StrategyPlan
    from cfnode.experiment.schedule import FailureSchedule
    from cfnode.testing.cluster import Cluster, HarnessNode

logger = logging.getLogger(__name__)

Observer = Callable[["Cluster", "HarnessNode", str, dict[str, Any]], None]

PLACEHOLDER_PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"
"""`--peers` of every local node: required by `cfnode join`, never dialled (the transport is in memory)."""
POLL_S = 0.5
SETTLE_S = 60.0
"""How long (virtual) a swarm that cannot finish keeps running before the run ends as unrecoverable."""


@dataclass(frozen=True)
class LocalKill:
    stage: int
    step: int
    """Killed once stage 0 has committed this many steps."""


@dataclass
class LocalRun:
    """What one local run produced, in the shapes `swarmrun.run_record` reads from a swarm run."""

    events: list[dict[str, Any]]
    """Every node's events, each with `node` (stage0, stage1, ..., spare0, ...) and `ts` (virtual seconds)."""
    kills: list[dict[str, Any]]
    """Like the demo's kill log: stage, at_step, killed_at_step, ts, node."""
    exit_code: int
    virtual_s: float
    wall_s: float
    crashes: list[str] = field(default_factory=list)


def run_local(common: Sequence[str], *, num_stages: int, spares: int, kills: Sequence[LocalKill] = (),
              seed: int = 0, limit_s: float = 1e6, wall_budget_s: float = 86400.0,
              observers: Sequence[Observer] = ()) -> LocalRun:
    """Run stages 0..L (`join *common --stage i`, named stage{i}) and `spares` spares (`join *common`, started
    once every stage is ONLINE, named spare{n}; one more after each rebuild, as the demo does) until stage 0
    reaches `--max-steps` (exit 0) or the swarm cannot go on (EXIT_UNRECOVERABLE: stage 0 lost without a copy,
    or no node left for a stage; 1: a node crashed or the virtual time limit passed). Each of `observers` sees
    every event as it is emitted, with the cluster (tests read the nodes' state there)."""
    from cfnode.cli import join_config_from_argv
    from cfnode.logs import kept_log_context
    from cfnode.testing.clock import CURRENT_NODE, ClockRegistry
    from cfnode.testing.logs import quiet
    from cfnode.testing.patches import Ledger, patched
    from cfnode.testing.vloop import VirtualTimeLoop

    argv = ["--peers", PLACEHOLDER_PEER, *common]
    configs = {i: join_config_from_argv([*argv, "--stage", str(i)]) for i in range(num_stages + 1)}
    spare_config = join_config_from_argv(argv)
    started = time.perf_counter()
    loop = VirtualTimeLoop(label=f"local run (seed {seed})", hard_limit_s=limit_s + 600.0,
                           wall_budget_s=wall_budget_s)
    box: dict[str, Any] = {}
    token = CURRENT_NODE.set(None)
    clocks = ClockRegistry()
    try:
        with patched(clocks, Ledger()), quiet(), kept_log_context():
            loop.run_until_complete(_run(box, clocks, configs, spare_config, num_stages=num_stages,
                                         spares=spares, kills=sorted(kills, key=lambda k: k.step), seed=seed,
                                         limit_s=limit_s, observers=observers))
    finally:
        CURRENT_NODE.reset(token)
        loop.close()
    cluster = box["cluster"]
    # `ts` and `time` in virtual seconds since the start (a node's clock.time() is an epoch-like virtual time)
    events = [{**fields, **({"time": t} if "time" in fields else {}), "event": event, "ts": t, "node": node}
              for t, _, node, event, fields in cluster.events]
    crashes = [h.crash for h in cluster.nodes.values() if h.crash]
    return LocalRun(events=events, kills=box["kills"], exit_code=box["code"], virtual_s=box["end"],
                    wall_s=time.perf_counter() - started, crashes=crashes)


async def _run(box: dict[str, Any], clocks: Any, configs: dict[int, NodeConfig], spare_config: NodeConfig, *,
               num_stages: int, spares: int, kills: list[LocalKill], seed: int, limit_s: float,
               observers: Sequence[Observer]) -> None:
    from cfnode.testing.clock import virtual_now
    from cfnode.testing.cluster import Cluster, peer_ids
    from cfnode.testing.drive import FINISHED, UNRECOVERABLE, run_until_done
    from cfnode.testing.faults import FaultDice

    cluster = Cluster(seed=seed, dice=FaultDice(seed), clocks=clocks)
    box["cluster"], box["kills"] = cluster, []
    ids = iter(peer_ids(seed, num_stages + 1 + spares + 2 * len(kills) + 1))
    pending = list(kills)
    online: set[int] = set()
    spares_started = 0

    def start_spare() -> None:
        nonlocal spares_started
        name = f"spare{spares_started}"
        spares_started += 1
        cluster.add(name, spare_config, peer_id=next(ids))
        cluster.start(name)

    def on_event(h: HarnessNode, event: str, fields: dict[str, Any]) -> None:
        if event == "online" and len(online) <= num_stages:
            online.add(int(fields["stage"]))
            if len(online) == num_stages + 1:  # every stage held: now the spares, which wait as STANDBY
                for _ in range(spares):
                    start_spare()
        elif event == "step" and h.node.driver is not None:
            step = int(fields["step"])
            while pending and step >= pending[0].step:
                kill = pending.pop(0)
                victim = cluster.serving(kill.stage)
                if victim is None:
                    logger.warning("no node holds stage %d at step %d: that failure is skipped", kill.stage, step)
                    continue
                cluster.kill(victim.name, f"schedule {kill.stage}@{kill.step}")
                box["kills"].append({"stage": kill.stage, "at_step": kill.step, "killed_at_step": step,
                                     "ts": virtual_now(), "node": victim.name, "member_loss": False,
                                     "nodes": [victim.name]})
        elif event == "recovery_finished":  # the demo too starts one more spare after each rebuild
            start_spare()

    cluster.event_hooks.append(on_event)
    for observe in observers:
        cluster.event_hooks.append(lambda h, event, fields, observe=observe: observe(cluster, h, event, fields))
    for i in range(num_stages + 1):
        cluster.add(f"stage{i}", configs[i], peer_id=next(ids))
        cluster.start(f"stage{i}")
    how = await run_until_done(cluster, num_stages, limit_s=limit_s, poll_s=POLL_S, settle_s=SETTLE_S,
                               stop_on_crash=True)
    code = {FINISHED: 0, UNRECOVERABLE: EXIT_UNRECOVERABLE}.get(how, 1)
    box["code"], box["end"] = code, virtual_now()
    await cluster.teardown()


def losses_by_step(events: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Stage 0's committed steps -> loss (a step retried after an abort is logged once, when it commits)."""
    return {int(e["step"]): float(e["loss"]) for e in events
            if e.get("event") == "step" and e.get("loss") is not None and math.isfinite(e["loss"])}


def run_local_record(options: ExperimentOptions, plan: StrategyPlan, level: FailureLevel | None,
                     schedule: FailureSchedule | None, steps: int, name: str) -> RunRecord:
    """One run of `cfnode experiment --engine local`: what `swarmrun.run_swarm` does with a fresh swarm, with
    the nodes of `run_local` configured by the same join flags (`demo.run_flags`), one node per stage."""
    from cfnode.demo import run_flags
    from cfnode.experiment.swarmrun import KillArgs, demo_options, fresh_workdir, run_record

    workdir = fresh_workdir(options, name)
    demo = demo_options(options, plan, steps, workdir, KillArgs((), ()))
    kills = [LocalKill(e.stage, e.step) for e in schedule.events] if schedule is not None and plan.injects else []
    logger.info("run %s (local engine): %d steps, failures at %s", name, steps,
                ", ".join(f"{k.stage}@{k.step}" for k in kills) or "none")
    run = run_local(run_flags(demo, workdir), num_stages=options.stages, spares=demo.spares, kills=kills,
                    seed=options.seed)
    with open(os.path.join(workdir, "events.jsonl"), "w", encoding="utf-8") as f:
        for e in run.events:
            f.write(json.dumps(e, default=str) + "\n")
    meta: dict[str, Any] = {"engine": "local", "workdir": workdir, "virtual_s": round(run.virtual_s, 3),
                            "wall_s": round(run.wall_s, 1), "kills_planned": [f"{k.stage}@{k.step}" for k in kills]}
    if run.crashes:
        meta["error"] = "; ".join(run.crashes)[:500]
    return run_record(strategy=plan.name, level=level, events=run.events, kills=run.kills, planned_steps=steps,
                      exit_code=run.exit_code, meta=meta)
