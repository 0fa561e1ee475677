"""What can go wrong, and who is alive: fault rates for messages and DHT calls, their seeded dice, and each
peer's liveness (killed: every I/O fails at once; stalled: every I/O blocks until thawed, like SIGSTOP).

Both the in-memory DHT (memdht.py) and the in-memory transport (memnet.py) consult one `Peers` and one
`FaultDice`, so a kill or a stall is seen by both at the same instant.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from cfnode.testing.clock import virtual_now


@dataclass(frozen=True)
class MessageFaults:
    """Per-RPC probabilities (each drawn once per call) and sizes."""

    drop: float = 0.0
    """The request is lost: half the time refused at once (ConnectionError), else black-holed (caller times
    out)."""
    delay: float = 0.0
    delay_max_s: float = 0.3
    duplicate: float = 0.0
    """The request is delivered twice (the second copy's reply is discarded)."""
    reorder: float = 0.0
    """The request is held back and delivered right after the next one on the same link (or after
    `hold_max_s`)."""
    hold_max_s: float = 0.2
    lost_reply: float = 0.0
    """The handler runs, its reply never arrives: the caller times out."""
    stream_cut: float = 0.0
    """A streamed reply (weights) ends early, as hivemind streams do under load."""
    latency_s: float = 0.001


@dataclass(frozen=True)
class DHTFaults:
    timeout: float = 0.0
    """A read or store hangs until the caller's deadline."""
    partial: float = 0.0
    """Each key of a read is missing with this probability."""
    slow_max_s: float = 0.0
    """Every call takes an extra U(0, slow_max_s)."""
    visibility_s: float = 0.0
    """A write reaches readers other than its writer this much later."""
    latency_s: float = 0.001


@dataclass(frozen=True)
class MessageFate:
    drop: str | None = None  # None, "refuse" or "blackhole"
    delay_s: float = 0.0
    duplicate: bool = False
    reorder: bool = False
    lost_reply: bool = False


@dataclass
class FaultDice:
    """Seeded decisions. Random faults apply while virtual time < `until_s` (then the network is quiet, so a
    recoverable swarm must converge)."""

    seed: int
    messages: MessageFaults = field(default_factory=MessageFaults)
    dht: DHTFaults = field(default_factory=DHTFaults)
    until_s: float = float("inf")

    def __post_init__(self) -> None:
        self._net = random.Random(f"{self.seed}:net")
        self._dht = random.Random(f"{self.seed}:dht")

    def active(self) -> bool:
        return virtual_now() < self.until_s

    def message(self) -> MessageFate:
        m, r = self.messages, self._net
        draws = [r.random() for _ in range(7)]  # a fixed number per call keeps the stream aligned
        if not self.active():
            return MessageFate()
        drop = None
        if draws[0] < m.drop:
            drop = "refuse" if draws[1] < 0.5 else "blackhole"
        delay = draws[3] * m.delay_max_s if draws[2] < m.delay else 0.0
        return MessageFate(drop=drop, delay_s=delay, duplicate=draws[4] < m.duplicate,
                           reorder=draws[5] < m.reorder, lost_reply=draws[6] < m.lost_reply)

    def stream_cut(self) -> bool:
        hit = self._net.random() < self.messages.stream_cut
        return hit and self.active()

    def dht_call(self) -> tuple[bool, float]:
        """(hangs, extra latency) of one DHT call."""
        d, r = self.dht, self._dht
        hang, slow = r.random(), r.random()
        if not self.active():
            return False, d.latency_s
        return hang < d.timeout, d.latency_s + slow * d.slow_max_s

    def key_missing(self) -> bool:
        hit = self._dht.random() < self.dht.partial
        return hit and self.active()

    def visibility_s(self) -> float:
        return self.dht.visibility_s if self.active() else 0.0


class PeerGone(ConnectionError):
    """The peer (caller or callee) was killed."""


class Peers:
    """Liveness of every peer id: alive, stalled (I/O blocks) or dead (I/O fails)."""

    def __init__(self) -> None:
        self._dead: dict[str, float] = {}
        self._running: dict[str, asyncio.Event] = {}

    def add(self, peer_id: str) -> None:
        event = asyncio.Event()
        event.set()
        self._running[peer_id] = event

    def is_dead(self, peer_id: str) -> bool:
        return peer_id in self._dead

    def count_alive(self) -> int:
        return sum(1 for p in self._running if p not in self._dead)

    def is_stalled(self, peer_id: str) -> bool:
        event = self._running.get(peer_id)
        return event is not None and not event.is_set()

    def check(self, peer_id: str) -> None:
        if peer_id in self._dead:
            raise PeerGone(f"peer {peer_id[:12]} is dead")

    async def gate(self, peer_id: str) -> None:
        """Return when the peer may do I/O; PeerGone if it is (or becomes) dead."""
        self.check(peer_id)
        event = self._running.get(peer_id)
        while event is not None and not event.is_set():
            await event.wait()
            self.check(peer_id)

    def kill(self, peer_id: str) -> None:
        self._dead[peer_id] = virtual_now()
        event = self._running.get(peer_id)
        if event is not None:
            event.set()  # blocked I/O wakes up and fails

    def stall(self, peer_id: str) -> None:
        self._running[peer_id].clear()

    def thaw(self, peer_id: str) -> None:
        self._running[peer_id].set()
