"""Scheduled faults: at a virtual time, when a node emits a named event ("claimed", "online",
"recovery_started", "step" ...), around an RPC handler (e.g. right after a commit ran, before its reply
leaves; or mid-stream, after a part of a weights download), or in a group's all-reduce (a member submitted; the
round filled, before its results are delivered). Each names an action (kill, stall for some seconds, stop
gracefully, expire a record early) and a victim, resolved when it fires (the node then serving a stage, a
spare, the emitter, the RPC's receiver or caller, a member of the all-reduce round).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from cfnode.net.records import stage_key, standby_key
from cfnode.testing.cluster import Cluster, HarnessNode
from cfnode.testing.memaverage import AverageCall
from cfnode.testing.memnet import Call

ACTIONS = ("kill", "stall", "stop", "expire", "start")
"""`start` starts a node the scenario has not started yet (a newcomer arriving at a protocol point)."""


@dataclass(frozen=True)
class Victim:
    """Who an action hits: "stage" (its current ONLINE holder), "spare" (the first live spare), "node" (by
    name), "self" (the node that emitted the event, or that submitted to an all-reduce round), "dst"/"src" (of
    the RPC), "member" (the value-th member, by peer id, of the all-reduce round)."""

    kind: str
    value: int | str | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind} {self.value}"


@dataclass(frozen=True)
class Fault:
    action: str
    victim: Victim
    stall_s: float = 0.0

    def __str__(self) -> str:
        extra = f" {self.stall_s:.2f}s" if self.action == "stall" else ""
        return f"{self.action}{extra} {self.victim}"


@dataclass(frozen=True)
class AtTime:
    at_s: float
    fault: Fault

    def __str__(self) -> str:
        return f"at t={self.at_s:.2f}s: {self.fault}"


@dataclass(frozen=True)
class OnEvent:
    """When a node emits `event` (with fields matching `match`) for the `nth` time."""

    event: str
    fault: Fault
    match: tuple[tuple[str, Any], ...] = ()
    nth: int = 1

    def __str__(self) -> str:
        cond = "".join(f" {k}={v}" for k, v in self.match)
        return f"on {self.event}{cond} #{self.nth}: {self.fault}"


@dataclass(frozen=True)
class OnRpc:
    """Around the `nth` handler run of `method` ("before" it runs or "after" it ran, before the reply)."""

    method: str
    phase: str
    fault: Fault
    nth: int = 1
    to_stage: int | None = None
    """Only calls to the node serving this stage."""

    detail: str | None = None
    """Only calls with this detail (rpc_get_weights: the uid, e.g. "state" for a newcomer's exact copy)."""

    def __str__(self) -> str:
        where = "" if self.to_stage is None else f" to stage {self.to_stage}"
        what = "" if self.detail is None else f" ({self.detail})"
        return f"{self.phase} rpc_{self.method}{what}{where} #{self.nth}: {self.fault}"


@dataclass(frozen=True)
class OnAverage:
    """At the `nth` all-reduce hook of `phase` ("submitted": a member's vector is in; "reducing": the round is
    full, its results not delivered yet) of stage `stage`'s group (None: any stage)."""

    phase: str
    fault: Fault
    nth: int = 1
    stage: int | None = None

    def __str__(self) -> str:
        where = "" if self.stage is None else f" of stage {self.stage}"
        return f"all-reduce {self.phase}{where} #{self.nth}: {self.fault}"


@dataclass(frozen=True)
class FaultPlan:
    timed: tuple[AtTime, ...] = ()
    on_event: tuple[OnEvent, ...] = ()
    on_rpc: tuple[OnRpc, ...] = ()
    on_average: tuple[OnAverage, ...] = ()

    def _all(self) -> tuple[AtTime | OnEvent | OnRpc | OnAverage, ...]:
        return (*self.timed, *self.on_event, *self.on_rpc, *self.on_average)

    def describe(self) -> list[str]:
        return [str(f) for f in self._all()]

    def faults(self) -> list[Fault]:
        return [f.fault for f in self._all()]


@dataclass
class ArmedPlan:
    """A plan attached to a cluster; `fired` lists what happened, `skipped` what found no victim."""

    plan: FaultPlan
    cluster: Cluster
    fired: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    _counts: dict[int, int] = field(default_factory=dict)

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        for item in self.plan.timed:
            loop.call_at(item.at_s, self._fire, str(item), item.fault, None, None)
        if self.plan.on_event:
            self.cluster.event_hooks.append(self._on_event)
        if self.plan.on_rpc:
            self.cluster.net.hooks.append(self._on_rpc)
        if self.plan.on_average:
            self.cluster.averaging.hooks.append(self._on_average)

    def _count(self, idx: int) -> int:
        self._counts[idx] = self._counts.get(idx, 0) + 1
        return self._counts[idx]

    def _on_event(self, h: HarnessNode, event: str, fields: dict[str, Any]) -> None:
        for idx, item in enumerate(self.plan.on_event):
            if item.event != event or any(fields.get(k) != v for k, v in item.match):
                continue
            if self._count(idx) == item.nth:
                self._fire(str(item), item.fault, h, None)

    def _on_rpc(self, phase: str, call: Call) -> None:
        for idx, item in enumerate(self.plan.on_rpc):
            if item.method != call.method or item.phase != phase:
                continue
            dst = self.cluster.by_peer.get(call.dst)
            if item.to_stage is not None and (dst is None or dst.node.stage != item.to_stage):
                continue
            if item.detail is not None and call.detail != item.detail:
                continue
            if self._count(1000 + idx) == item.nth:
                self._fire(str(item), item.fault, None, call)

    def _on_average(self, phase: str, call: AverageCall) -> None:
        for idx, item in enumerate(self.plan.on_average):
            if item.phase != phase or (item.stage is not None and not call.prefix.endswith(f"_stage{item.stage}")):
                continue
            if self._count(2000 + idx) == item.nth:
                self._fire(str(item), item.fault, None, None, call)

    def _victim(self, victim: Victim, emitter: HarnessNode | None, call: Call | None,
                avg: AverageCall | None = None) -> HarnessNode | None:
        c = self.cluster
        if victim.kind == "self" and avg is not None:
            return c.by_peer.get(avg.peer) if avg.peer is not None else None
        if victim.kind == "member" and avg is not None:
            assert isinstance(victim.value, int)
            members = avg.members
            return c.by_peer.get(members[victim.value % len(members)]) if members else None
        if victim.kind == "self":
            return emitter
        if victim.kind in ("dst", "src") and call is not None:
            return c.by_peer.get(call.dst if victim.kind == "dst" else call.src)
        if victim.kind == "stage":
            assert isinstance(victim.value, int)
            return c.serving(victim.value)
        if victim.kind == "spare":
            spares = c.spares()
            return spares[0] if spares else None
        if victim.kind == "node":
            return c.nodes.get(str(victim.value))
        raise ValueError(f"unknown victim {victim}")

    def _fire(self, label: str, fault: Fault, emitter: HarnessNode | None, call: Call | None,
              avg: AverageCall | None = None) -> None:
        h = self._victim(fault.victim, emitter, call, avg)
        if fault.action == "start":
            if h is None or h.task is not None:
                self.skipped.append(f"{label} (no node left to start)")
                return
            self.cluster.start(h.name)
            self.fired.append(f"{label} -> {h.name}")
            return
        if h is None or not h.alive or h.task is None:
            self.skipped.append(f"{label} (no live victim)")
            return
        c, done = self.cluster, False
        if fault.action == "kill":
            done = c.kill(h.name, label)
        elif fault.action == "stall":
            done = c.stall(h.name, fault.stall_s, label)
        elif fault.action == "stop":
            asyncio.get_running_loop().create_task(c.stop(h.name, label), name=f"stop-{h.name}")
            done = True
        elif fault.action == "expire":
            node = h.node
            key = (standby_key(node.run_id) if node.stage is None
                   else stage_key(node.run_id, node.stage))
            done = c.dht.expire(key, h.peer_id)
            if done:
                c.act(h.name, "expire", f"{key} ({label})")
        (self.fired if done else self.skipped).append(f"{label} -> {h.name}")
