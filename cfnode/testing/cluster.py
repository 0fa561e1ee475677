"""A swarm of real `cfnode.node.Node`s in one process, on one virtual-time loop, over the in-memory DHT and
transport: start, kill (kill -9: every I/O fails at once, the OFFLINE goodbye never lands), stall and thaw
(SIGSTOP / SIGCONT), stop gracefully; and the record of what happened (events, actions, task failures).

Every node runs in its own `contextvars.Context` (CURRENT_NODE = its name), so its tasks, and the handler tasks
the transport starts for it, read its own skewed clock and are attributed to it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cfnode.config import NodeConfig
from cfnode.node import Node
from cfnode.testing.clock import CURRENT_NODE, ClockRegistry, VirtualClock, next_order, virtual_now
from cfnode.testing.executor import InlineExecutor
from cfnode.testing.faults import FaultDice, Peers
from cfnode.testing.memaverage import AverageHub
from cfnode.testing.memberstate import StateRecorder
from cfnode.testing.memdht import MemoryDHT, MemorySwarm
from cfnode.testing.memnet import MemoryNetwork, NodeNetwork

logger = logging.getLogger(__name__)
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"

EventHook = Callable[["HarnessNode", str, dict[str, Any]], None]


def peer_ids(seed: int, count: int) -> list[str]:
    """Deterministic base58 peer ids ("12D3KooW..." like libp2p's) whose 12-character prefixes (what the node
    logs and puts in events) are distinct."""
    rng = random.Random(f"{seed}:ids")
    out: list[str] = []
    while len(out) < count:
        pid = "12D3KooW" + "".join(rng.choice(BASE58) for _ in range(44))
        if all(p[:12] != pid[:12] for p in out):
            out.append(pid)
    return out


def where(exc: BaseException) -> str:
    """The innermost frames of node code (not harness, not library) an exception passed through."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/cfnode/" in f.filename and "/cfnode/testing/" not in f.filename and "/cfnode/deadline" not in f.filename]
    return " <- ".join(f"{f.filename.split('/cfnode/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


@dataclass
class HarnessNode:
    name: str
    peer_id: str
    clock: VirtualClock
    config: NodeConfig
    node: Node
    context: contextvars.Context
    task: asyncio.Task[None] | None = None
    started_at: float | None = None
    killed_at: float | None = None
    killed_order: int | None = None
    """Recording order of the kill (what happened at the same virtual instant, before it, is not after it)."""
    stopped_at: float | None = None
    stalled: bool = False
    finished: bool = False
    """Node.run() returned (stage 0's driver reached max_steps)."""
    crash: str | None = None
    """Node.run() raised while the node was alive and not being stopped."""
    task_failures: list[str] = field(default_factory=list)
    drivers: list[tuple[Any, int]] = field(default_factory=list)
    """Every Driver this node ran, with the step it started training at."""
    stage_when_lost: int | None = None
    """The stage it held (or was claiming) when the harness killed or stopped it."""
    interrupted: dict[int, int] = field(default_factory=dict)
    """id(driver) -> microbatches of the attempt it was running when the harness stopped or killed the node."""

    @property
    def alive(self) -> bool:
        return self.killed_at is None and self.stopped_at is None and not self.finished

    def lost_at(self, before: float | None) -> float | None:
        """When the scenario killed or stopped it (not counting the final teardown at `before`)."""
        at = self.killed_at if self.killed_at is not None else self.stopped_at
        return at if at is not None and (before is None or at < before) else None


class Cluster:
    def __init__(self, *, seed: int, dice: FaultDice, clocks: ClockRegistry | None = None) -> None:
        self.seed = seed
        self.dice = dice
        self.peers = Peers()
        self.clocks = clocks if clocks is not None else ClockRegistry()
        self.dht = MemoryDHT(self.peers, dice)
        self.net = MemoryNetwork(self.peers, dice, self._context_of)
        self.averaging = AverageHub(self.peers, seed=seed)
        """The stage groups' all-reduce (memaverage.py)."""
        self.states: StateRecorder | None = None
        """Set (`record_states()`) to keep every member's state after each applied step (groups' invariant)."""
        self.nodes: dict[str, HarnessNode] = {}
        self.by_peer: dict[str, HarnessNode] = {}
        self.events: list[tuple[float, int, str, str, dict[str, Any]]] = []
        """(virtual time, recording order, node, event, fields)"""
        self.actions: list[tuple[float, int, str, str, str]] = []
        """(virtual time, recording order, node, action, why)"""
        self.event_hooks: list[EventHook] = []
        self.teardown_at: float | None = None
        self._ids: list[str] = []

    def _context_of(self, peer_id: str) -> contextvars.Context | None:
        h = self.by_peer.get(peer_id)
        return h.context if h is not None else None

    def name_of(self, peer_id: str) -> str:
        h = self.by_peer.get(peer_id)
        return h.name if h is not None else peer_id[:12]

    # -- building ----------------------------------------------------------------------------------------

    def add(self, name: str, config: NodeConfig, *, peer_id: str, skew_s: float = 0.0) -> HarnessNode:
        """Create a node (not started). Call inside the running loop."""
        clock = VirtualClock(skew_s)
        self.clocks.clocks[name] = clock
        self.peers.add(peer_id)
        context = contextvars.copy_context()
        context.run(CURRENT_NODE.set, name)
        swarm = MemorySwarm(self.dht, peer_id, run_id=config.run_id, num_stages=config.model.num_stages,
                            ttl_s=config.heartbeat.ttl_s, clock=clock)
        network: NodeNetwork = self.net.for_node(peer_id, config.network)
        rng = random.Random(f"{self.seed}:node:{name}")
        node = context.run(Node, config, swarm, network, clock=clock, rng=rng, executor=InlineExecutor(),
                           averagers=self.averaging.factory(peer_id))
        h = HarnessNode(name, peer_id, clock, config, node, context)
        self._instrument(h)
        self.nodes[name] = h
        self.by_peer[peer_id] = h
        return h

    def _instrument(self, h: HarnessNode) -> None:
        emit = h.node.events.emit

        def emit_and_record(event: str, **fields: Any) -> None:
            emit(event, **fields)
            if event == "training_started" and h.node.driver is not None:
                if all(d is not h.node.driver for d, _ in h.drivers):
                    h.drivers.append((h.node.driver, int(fields.get("step", 0))))
            self.events.append((virtual_now(), next_order(), h.name, event, fields))
            if event == "online" and self.states is not None and h.node.joined_from:
                self.states.note(h, "joined")  # an exact copy: it must equal its group at that step
            for hook in list(self.event_hooks):
                hook(h, event, fields)

        h.node.events.emit = emit_and_record  # type: ignore[method-assign]
        after_commit = h.node.after_commit

        def after_commit_and_record(norm: float, raw: float) -> None:
            after_commit(norm, raw)
            if self.states is not None:
                self.states.note(h, "applied")

        h.node.after_commit = after_commit_and_record  # type: ignore[method-assign]
        task_done = h.node._task_done

        def note_task(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None and h.killed_at is None:
                exc = task.exception()
                h.task_failures.append(f"t={virtual_now():.3f} task {task.get_name()}: {type(exc).__name__}: {exc} "
                                       f"({where(exc)})")
            task_done(task)

        h.node._task_done = note_task  # type: ignore[method-assign]

    # -- lifecycle ---------------------------------------------------------------------------------------

    def act(self, name: str, action: str, why: str = "") -> None:
        self.actions.append((virtual_now(), next_order(), name, action, why))
        logger.info("%s %s %s", action, name, why)

    def start(self, name: str) -> None:
        h = self.nodes[name]
        h.started_at = virtual_now()
        self.act(name, "start")
        h.task = asyncio.get_running_loop().create_task(self._run(h), name=f"node-{name}", context=h.context)

    async def _run(self, h: HarnessNode) -> None:
        try:
            await h.node.run()
        except asyncio.CancelledError:
            if h.alive:  # not the harness cancelling it
                h.crash = f"t={virtual_now():.3f} Node.run() was cancelled from inside"
            return
        except Exception as e:
            if h.killed_at is None and h.stopped_at is None:
                h.crash = f"t={virtual_now():.3f} Node.run() raised {type(e).__name__}: {e} ({where(e)})"
                logger.info("node %s crashed", h.name, exc_info=e)
            return
        h.finished = True
        self.act(h.name, "finished")

    def _note_interrupted(self, h: HarnessNode) -> None:
        h.stage_when_lost = h.node.stage
        driver = h.node.driver
        if driver is not None and driver.attempt is not None:
            h.interrupted[id(driver)] = h.config.train.num_microbatches

    def kill(self, name: str, why: str = "") -> bool:
        """kill -9: all its I/O fails from now on; its tasks are cancelled (its goodbye write cannot land)."""
        h = self.nodes[name]
        if h.killed_at is not None or h.stopped_at is not None or h.task is None:
            return False
        self._note_interrupted(h)
        h.killed_at = virtual_now()
        h.killed_order = next_order()
        self.act(name, "kill", why)
        self.peers.kill(h.peer_id)
        self.net.cancel_handlers(h.peer_id)
        if not h.task.done():
            h.task.cancel()
        return True

    def stall(self, name: str, seconds: float, why: str = "") -> bool:
        h = self.nodes[name]
        if not h.alive or h.stalled or h.task is None:
            return False
        h.stalled = True
        self.act(name, "stall", f"{seconds:.2f}s {why}".strip())
        self.peers.stall(h.peer_id)
        asyncio.get_running_loop().call_later(seconds, self.thaw, name)
        return True

    def thaw(self, name: str) -> None:
        h = self.nodes[name]
        if not h.stalled:
            return
        h.stalled = False
        self.act(name, "thaw")
        self.peers.thaw(h.peer_id)

    async def stop(self, name: str, why: str = "") -> None:
        """Graceful stop: cancel Node.run(), whose finally announces OFFLINE and closes everything."""
        h = self.nodes[name]
        if h.task is None or h.stopped_at is not None:
            return
        if h.killed_at is not None:
            await asyncio.gather(h.task, return_exceptions=True)
            return
        if h.stalled:
            self.thaw(name)
        self._note_interrupted(h)
        h.stopped_at = virtual_now()
        self.act(name, "stop", why)
        if not h.task.done():
            h.task.cancel()
        await asyncio.gather(h.task, return_exceptions=True)

    async def teardown(self) -> list[str]:
        """Stop every node (gracefully, dead ones are just awaited) and return what is still pending."""
        self.teardown_at = virtual_now()
        for name in list(self.nodes):
            await self.stop(name, "teardown")
        for h in self.nodes.values():
            await self.net.stop_handlers(h.peer_id)
        for _ in range(8):
            await asyncio.sleep(0)
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        return sorted(f"{t.get_name()} {t.get_coro()!r:.160}" for t in pending)

    # -- views of the swarm ------------------------------------------------------------------------------

    def serving(self, stage: int) -> HarnessNode | None:
        """The live node that believes it serves `stage` (lowest name if several do)."""
        from cfnode.net.records import StageState

        for h in self.nodes.values():
            if h.alive and h.node.stage == stage and h.node.state is StageState.ONLINE:
                return h
        return None

    def spares(self) -> list[HarnessNode]:
        from cfnode.net.records import StageState

        return [h for h in self.nodes.values() if h.alive and h.task is not None
                and h.node.state in (StageState.STANDBY, StageState.JOINING) and h.node.stage is None]
