"""Run one seeded scenario end to end on a fresh virtual-time loop and check every invariant.

The trace (events, harness actions, DHT store outcomes, RPC deliveries, each with its virtual time) is what
replay compares: the same seed must give the same trace, byte for byte (`Outcome.digest`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cfnode.testing import invariants as inv
from cfnode.testing.clock import CURRENT_NODE, ClockRegistry, virtual_now
from cfnode.testing.cluster import Cluster, HarnessNode, peer_ids
from cfnode.testing.drive import run_until_done
from cfnode.testing.faults import FaultDice, PeerGone
from cfnode.testing.logs import log_trace, quiet, verbose
from cfnode.testing.memberstate import GroupFacts, GroupSizes, StateRecorder
from cfnode.testing.patches import Ledger, patched
from cfnode.testing.plan import ArmedPlan
from cfnode.testing.scenario import TTL_S, Scenario, generate
from cfnode.testing.vloop import DeadlockError, VirtualTimeExceeded, VirtualTimeLoop, WallClockExceeded

logger = logging.getLogger(__name__)
POLL_S = 0.25
SETTLE_S = 3 * TTL_S
"""How long an unrecoverable swarm keeps running (safety invariants still apply) before the scenario ends."""
WALL_BUDGET_S = 300.0


def replay_command(seed: int) -> str:
    return f"CFNODE_HARNESS_SEED={seed} .venv/bin/python -m pytest tests/harness -k scenario_seed -s"


@dataclass
class Outcome:
    scenario: Scenario
    trace: list[tuple[Any, ...]]
    violations: list[str]
    summary: str
    virtual_s: float
    wall_s: float
    fired: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    groups: GroupFacts | None = None
    """A groups scenario's sizes, participants and compared states (None with one peer per stage)."""

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self.trace).encode()).hexdigest()

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        head = f"seed {self.scenario.seed}: {len(self.violations)} violation(s); {self.summary}"
        lines = [head, *("  " + v for v in self.violations), "scenario:",
                 *("  " + line for line in self.scenario.describe())]
        if self.fired or self.skipped:
            lines += ["fault plan:", *("  fired " + f for f in self.fired), *("  skipped " + s for s in self.skipped)]
        lines.append(f"replay: {replay_command(self.scenario.seed)}")
        return "\n".join(lines)


def _trace(cluster: Cluster) -> list[tuple[Any, ...]]:
    """Everything recorded, in the order it happened: (virtual time, kind, ...)."""
    name = cluster.name_of
    rows: list[tuple[int, tuple[Any, ...]]] = []
    for t, order, who, event, fields in cluster.events:
        rows.append((order, (round(t, 6), "event", who, event, tuple(sorted(fields.items())))))
    for t, order, who, action, why in cluster.actions:
        rows.append((order, (round(t, 6), "action", who, action, why)))
    for w in cluster.dht.writes:
        v = w.value if isinstance(w.value, dict) else {}
        rows.append((w.order, (round(w.time, 6), "dht", name(w.writer), w.key, v.get("state"), v.get("generation"),
                               v.get("step"), round(w.expiration, 6), w.outcome)))
    for d in cluster.net.log:
        rows.append((d.order, (round(d.time, 6), "rpc", d.seq, d.method, name(d.src), name(d.dst), d.outcome)))
    for r in cluster.averaging.log:
        rows.append((r.order, (round(r.time, 6), "average", r.prefix, r.size, r.tag,
                               tuple(name(p) for p in r.members), r.outcome)))
    return [row for _, row in sorted(rows, key=lambda r: r[0])]


async def _scenario(sc: Scenario, box: dict[str, Any], clocks: ClockRegistry) -> None:
    loop = asyncio.get_running_loop()
    dice = FaultDice(sc.seed, sc.messages, sc.dht, until_s=sc.faults_until_s)
    cluster = Cluster(seed=sc.seed, dice=dice, clocks=clocks)
    box["cluster"] = cluster
    for name, pid, skew in zip(sc.names, peer_ids(sc.seed, sc.num_nodes), sc.skews, strict=True):
        cluster.add(name, sc.node_config(name), peer_id=pid, skew_s=skew)
    sizes = _watch_groups(cluster, sc) if sc.replicas > 1 else None
    box["sizes"] = sizes
    run_id = sc.config().run_id
    for name, at in zip(sc.names, sc.start_at, strict=True):
        if math.isfinite(at):  # inf: the fault plan starts it (a newcomer at a protocol point)
            loop.call_at(at, cluster.start, name)
    armed = ArmedPlan(sc.plan, cluster)
    box["armed"] = armed
    armed.arm()

    def sample_sizes() -> None:
        assert sizes is not None
        sizes.sample_view(cluster.dht.true_view(run_id, sc.num_stages), sc.num_stages, cluster.name_of)

    await run_until_done(cluster, sc.num_stages, limit_s=sc.limit_s, poll_s=POLL_S, settle_s=SETTLE_S,
                         on_poll=sample_sizes if sizes is not None else None)
    box["end"] = virtual_now()
    box["pending"] = await cluster.teardown()


def _watch_groups(cluster: Cluster, sc: Scenario) -> GroupSizes:
    """Stage groups: keep every member's state after each applied step, and the groups' sizes (the DHT's truth
    whenever a node goes ONLINE, the participants of every committed step)."""
    cluster.states = StateRecorder()
    sizes = GroupSizes(sc.replicas)
    run_id = sc.config().run_id

    def on_event(h: HarnessNode, event: str, fields: dict[str, Any]) -> None:
        if event == "online":
            sizes.sample_view(cluster.dht.true_view(run_id, sc.num_stages), sc.num_stages, cluster.name_of)
        elif event == "step" and h.node.driver is not None:
            sizes.sample_participants(dict(h.node.driver.paths.participants), int(fields["step"]), cluster.name_of)

    cluster.event_hooks.append(on_event)
    return sizes


def _cancel_everything(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        try:
            loop.run_until_complete(asyncio.wait(tasks, timeout=5.0))
        except (DeadlockError, VirtualTimeExceeded, WallClockExceeded) as e:
            logger.warning("could not unwind the scenario's tasks: %s", e)


def _loop_error(loop: asyncio.AbstractEventLoop, ctx: dict[str, Any], errors: list[str]) -> None:
    """An error only the event loop saw (e.g. a task's exception nobody retrieved). A killed peer's I/O failing
    (PeerGone) while its tasks are being cancelled is the kill model, not a finding."""
    if isinstance(ctx.get("exception"), PeerGone):
        return
    where = ctx.get("future") or ctx.get("handle") or ""
    name = where.get_name() if isinstance(where, asyncio.Task) else ""
    coro = where.get_coro().__qualname__ if isinstance(where, asyncio.Task) else ""
    errors.append(f"t={loop.time():.3f} {ctx.get('message')}: {ctx.get('exception')!r} in {name} {coro}".rstrip())


def run_scenario(seed: int, scenario: Scenario | None = None, *, trace_logs: bool = False) -> Outcome:
    """Run `seed`'s scenario (or the one given) and check all invariants; `trace_logs` logs every node's lines
    (with virtual time) and the trace."""
    sc = scenario or generate(seed)
    started = time.perf_counter()
    threads_before = sorted(t.name for t in threading.enumerate())
    loop = VirtualTimeLoop(label=f"seed {sc.seed}", hard_limit_s=sc.limit_s + 120.0, wall_budget_s=WALL_BUDGET_S)
    loop.set_exception_handler(lambda lp, ctx: _loop_error(lp, ctx, box.setdefault("loop_errors", [])))
    ledger, clocks = Ledger(), ClockRegistry()
    box: dict[str, Any] = {}
    violations: list[str] = []
    token = CURRENT_NODE.set(None)
    try:
        with patched(clocks, ledger), (verbose() if trace_logs else quiet()):
            try:
                loop.run_until_complete(_scenario(sc, box, clocks))
            except (DeadlockError, VirtualTimeExceeded, WallClockExceeded) as e:
                violations.append(f"[liveness] {e} (seed {sc.seed})")
                box.setdefault("end", loop.time())
                _cancel_everything(loop)
    finally:
        CURRENT_NODE.reset(token)
        loop.close()
    cluster: Cluster = box["cluster"]
    armed: ArmedPlan = box["armed"]
    threads_after = sorted(t.name for t in threading.enumerate())
    config = sc.config()
    sizes: GroupSizes | None = box.get("sizes")
    if sizes is None:
        violations += inv.single_online_owner(cluster.dht.writes, config.run_id, cluster.name_of)
    else:  # several ONLINE peers per (stage, generation) is the point of a group: bound and compare them
        violations += inv.group_size(sizes)
        violations += inv.identical_members(cluster)
    violations += inv.updates_match_steps(ledger)
    violations += inv.contiguous_steps(cluster)
    violations += inv.microbatch_accounting(cluster)
    violations += inv.clean_teardown(box.get("pending", []), threads_before, threads_after)
    violations += inv.no_crashes(cluster)
    violations += inv.dead_stay_silent(cluster)
    violations += [f"[loop] {e}" for e in box.get("loop_errors", [])]
    lacking, summary = inv.progress(cluster, sc.num_stages, sc.steps, sc.limit_s)
    violations += lacking
    trace = _trace(cluster)
    if trace_logs:
        log_trace(trace)
    facts = None
    if sizes is not None and cluster.states is not None:
        facts = GroupFacts(compared=cluster.states.compared, largest=dict(sizes.largest),
                           participants=list(sizes.participants),
                           peer_ids={h.name: h.peer_id for h in cluster.nodes.values()})
    return Outcome(sc, trace, violations, f"{summary} (t={box.get('end', 0.0):.2f}s virtual)",
                   virtual_s=box.get("end", 0.0), wall_s=time.perf_counter() - started,
                   fired=armed.fired, skipped=armed.skipped, groups=facts)
