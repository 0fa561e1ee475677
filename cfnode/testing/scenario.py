"""Scenarios from a seed: the swarm (L = 2 or 3 transformer stages, 0-2 spares), the number of steps, the node
configs, and a fault plan. Seed k's main fault kind is KINDS[k % len(KINDS)], so any run of len(KINDS)
consecutive seeds covers every kind; one or two more kinds are drawn at random on top.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from cfnode.config import (
    GroupConfig,
    HeartbeatConfig,
    MetricsConfig,
    NetworkConfig,
    NodeConfig,
    RecoveryConfig,
    TrainConfig,
    preset,
)
from cfnode.testing.faults import DHTFaults, MessageFaults
from cfnode.testing.plan import AtTime, Fault, FaultPlan, OnEvent, OnRpc, Victim

KINDS = (
    "drop", "delay", "duplicate", "reorder", "lost_reply", "stream_cut", "stall_past_ttl", "stall_short",
    "kill", "kill_at_point", "kill_after_commit", "kill_in_recovery", "leave", "expire", "skew", "claim_storm",
    "dht_timeout", "partial_read", "slow_dht", "visibility",
)
POINTS = ("claimed", "online", "standby", "training_started", "neighbour_lost", "fenced", "recovery_finished")
PERIOD_S, TTL_S = 0.5, 2.5
CLAIM_JITTER_S = 0.3
"""The claim protocol assumes a DHT write reaches every reader within the claim jitter (docs/protocol.md);
visibility faults stay inside that bound, so "one ONLINE owner per (stage, generation)" must hold strictly."""
LIMIT_S = 60.0
AVERAGING_TIMEOUT_S = 2.0
"""A groups run's all-reduce timeout (prepare's timeout is the request timeout plus twice this)."""
JOIN_TIMEOUT_S = 10.0
"""A groups run's admission hold: how long stage 0 holds the ring for a newcomer's copy."""


@dataclass(frozen=True)
class Scenario:
    seed: int
    num_stages: int
    spares: int
    steps: int
    start_at: tuple[float, ...]
    skews: tuple[float, ...]
    messages: MessageFaults
    dht: DHTFaults
    faults_until_s: float
    plan: FaultPlan
    kinds: tuple[str, ...]
    limit_s: float = LIMIT_S
    latency_s: float = 0.002
    names: tuple[str, ...] = field(default=())
    replicas: int = 1
    """Stage groups (docs/groups.md): up to this many members per transformer stage (1: one peer per stage)."""
    spare_names: tuple[str, ...] = ()
    """Nodes started with --spare (wait as STANDBY, never join a group)."""
    extra_nodes: int = 0
    """Nodes beyond one per stage and the spares (with groups: the members that join a group)."""

    @property
    def num_nodes(self) -> int:
        return self.num_stages + 1 + self.spares + self.extra_nodes

    def node_config(self, name: str) -> NodeConfig:
        """The config of node `name` (the run's, plus --spare for a spare of a groups run)."""
        config = self.config()
        if name in self.spare_names:
            config = replace(config, group=replace(config.group, spare=True))
        return config

    def config(self) -> NodeConfig:
        return NodeConfig(
            run_id="harness",
            model=preset("tiny", num_stages=self.num_stages),
            train=TrainConfig(lr=1e-3, num_microbatches=2, microbatch_size=1, max_in_flight=2, max_steps=self.steps,
                              val_every=0, step_timeout_s=3.0, retry_backoff_s=0.2),
            network=NetworkConfig(request_timeout_s=1.0, ping_timeout_s=0.3),
            heartbeat=HeartbeatConfig(period_s=PERIOD_S, ttl_s=TTL_S, claim_jitter_s=CLAIM_JITTER_S),
            recovery=RecoveryConfig(fetch_timeout_s=3.0),
            metrics=MetricsConfig(port=None),
            group=GroupConfig(replicas=self.replicas, averaging_timeout_s=AVERAGING_TIMEOUT_S,
                              join_timeout_s=JOIN_TIMEOUT_S) if self.replicas > 1 else GroupConfig(),
        )

    def describe(self) -> list[str]:
        groups = f", replicas {self.replicas}, {self.extra_nodes} more member(s)" if self.replicas > 1 else ""
        lines = [f"seed {self.seed}: L={self.num_stages}, {self.spares} spare(s){groups}, {self.steps} steps, "
                 f"kinds {', '.join(self.kinds)}",
                 "starts " + ", ".join(f"{n}@{t:.2f}s" if t != float("inf") else f"{n}@plan"
                                       for n, t in zip(self.names, self.start_at, strict=True))]
        if self.spare_names:
            lines.append(f"--spare: {', '.join(self.spare_names)}")
        if any(self.skews):
            lines.append("skews " + ", ".join(f"{n}{s:+.2f}s" for n, s in zip(self.names, self.skews, strict=True)))
        m, d = self.messages, self.dht
        rates = [f"{k}={getattr(m, k):.2f}" for k in ("drop", "delay", "duplicate", "reorder", "lost_reply",
                                                       "stream_cut") if getattr(m, k)]
        rates += [f"dht_{k}={getattr(d, k):.2f}" for k in ("timeout", "partial", "slow_max_s", "visibility_s")
                  if getattr(d, k)]
        if rates:
            lines.append(f"random faults until t={self.faults_until_s:.1f}s: {' '.join(rates)}")
        lines += [f"plan: {p}" for p in self.plan.describe()]
        return lines


def _stage_victim(rng: random.Random, num_stages: int, *, stage0: float = 0.1) -> Victim:
    return Victim("stage", 0 if rng.random() < stage0 else rng.randint(1, num_stages))


def _add_kind(kind: str, rng: random.Random, sc: dict, plan: dict) -> None:
    m, d, L, steps = sc["messages"], sc["dht"], sc["num_stages"], sc["steps"]
    at_step = (("step", rng.randint(1, max(1, steps - 2))),)
    if kind == "drop":
        sc["messages"] = replace(m, drop=rng.uniform(0.02, 0.08))
    elif kind == "delay":
        sc["messages"] = replace(m, delay=rng.uniform(0.1, 0.4), delay_max_s=rng.uniform(0.05, 0.8))
    elif kind == "duplicate":
        sc["messages"] = replace(m, duplicate=rng.uniform(0.05, 0.25))
    elif kind == "reorder":
        sc["messages"] = replace(m, reorder=rng.uniform(0.05, 0.25))
    elif kind == "lost_reply":
        sc["messages"] = replace(m, lost_reply=rng.uniform(0.02, 0.06))
    elif kind == "stream_cut":  # only weights are streamed: needs a rebuild, so lose a stage too
        sc["messages"] = replace(m, stream_cut=rng.uniform(0.2, 0.5))
        sc["spares"] = max(sc["spares"], 1)
        plan["on_event"].append(OnEvent("step", Fault("kill", Victim("stage", rng.randint(1, L))), at_step))
    elif kind in ("stall_past_ttl", "stall_short"):
        secs = TTL_S * (rng.uniform(1.2, 2.5) if kind == "stall_past_ttl" else rng.uniform(0.2, 0.8))
        fault = Fault("stall", _stage_victim(rng, L, stage0=0.25) if rng.random() < 0.85 else Victim("spare"), secs)
        if rng.random() < 0.5:
            plan["on_event"].append(OnEvent("step", fault, at_step))
        else:
            plan["timed"].append(AtTime(rng.uniform(0.5, 4.0), fault))
    elif kind == "kill":
        fault = Fault("kill", _stage_victim(rng, L))
        if rng.random() < 0.6:
            plan["on_event"].append(OnEvent("step", fault, at_step))
        else:
            plan["timed"].append(AtTime(rng.uniform(0.5, 4.0), fault))
    elif kind == "kill_at_point":
        action = "kill" if rng.random() < 0.7 else "stall"
        plan["on_event"].append(OnEvent(rng.choice(POINTS), Fault(action, Victim("self"), TTL_S * 1.5),
                                        nth=rng.randint(1, 3)))
    elif kind == "kill_after_commit":
        action = rng.choice(("kill", "kill", "stall"))
        plan["on_rpc"].append(OnRpc("commit", "after", Fault(action, Victim("dst"), TTL_S * rng.uniform(0.5, 2.0)),
                                    nth=rng.randint(1, max(1, L * (steps - 1)))))
    elif kind == "kill_in_recovery":  # lose a stage, then kill (or stall) its rebuilder mid-rebuild
        sc["spares"] = max(sc["spares"], rng.choice((1, 2)))
        plan["on_event"].append(OnEvent("step", Fault("kill", Victim("stage", rng.randint(1, L))), at_step))
        action = "kill" if rng.random() < 0.7 else "stall"
        plan["on_event"].append(OnEvent("recovery_started", Fault(action, Victim("self"), TTL_S * 1.5)))
    elif kind == "leave":  # a graceful stop: its OFFLINE goodbye lands, a spare takes over
        sc["spares"] = max(sc["spares"], 1)
        plan["on_event"].append(OnEvent("step", Fault("stop", Victim("stage", rng.randint(1, L))), at_step))
    elif kind == "expire":
        fault = Fault("expire", _stage_victim(rng, L, stage0=0.3))
        if rng.random() < 0.5:
            plan["on_event"].append(OnEvent("step", fault, at_step))
        else:
            plan["timed"].append(AtTime(rng.uniform(0.5, 4.0), fault))
    elif kind == "skew":
        sc["skews"] = tuple(round(rng.uniform(-0.4, 0.4), 3) for _ in range(5))
    elif kind == "claim_storm":
        sc["simultaneous"] = True
        sc["spares"] = 2
    elif kind == "dht_timeout":
        sc["dht"] = replace(d, timeout=rng.uniform(0.02, 0.08))
    elif kind == "partial_read":
        sc["dht"] = replace(d, partial=rng.uniform(0.05, 0.2))
    elif kind == "slow_dht":
        sc["dht"] = replace(d, slow_max_s=rng.uniform(0.05, 0.6))
    elif kind == "visibility":
        sc["dht"] = replace(d, visibility_s=rng.uniform(0.05, 0.9 * CLAIM_JITTER_S))
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


def generate(seed: int) -> Scenario:
    rng = random.Random(f"{seed}:scenario")
    kinds = [KINDS[seed % len(KINDS)]]
    for _ in range(rng.choice((0, 1, 1, 2))):
        extra = rng.choice(KINDS)
        if extra not in kinds:
            kinds.append(extra)
    latency = rng.uniform(0.001, 0.01)
    sc: dict = {"num_stages": rng.choice((2, 3)), "spares": rng.choice((0, 1, 1, 2)), "steps": rng.randint(4, 8),
                "messages": MessageFaults(latency_s=latency), "dht": DHTFaults(latency_s=latency / 2),
                "skews": (), "simultaneous": rng.random() < 0.4}
    plan: dict = {"timed": [], "on_event": [], "on_rpc": []}
    for kind in kinds:
        _add_kind(kind, rng, sc, plan)
    n = sc["num_stages"] + 1 + sc["spares"]
    names = tuple(f"n{i}" for i in range(n))
    start_at = (0.0,) * n if sc["simultaneous"] else tuple(round(rng.uniform(0.0, 1.5), 3) for _ in range(n))
    skews = tuple(sc["skews"][i] if i < len(sc["skews"]) else 0.0 for i in range(n))
    return Scenario(seed=seed, num_stages=sc["num_stages"], spares=sc["spares"], steps=sc["steps"], start_at=start_at,
                    skews=skews, messages=sc["messages"], dht=sc["dht"], faults_until_s=rng.uniform(5.0, 15.0),
                    plan=FaultPlan(tuple(plan["timed"]), tuple(plan["on_event"]), tuple(plan["on_rpc"])),
                    kinds=tuple(kinds), latency_s=latency, names=names)
