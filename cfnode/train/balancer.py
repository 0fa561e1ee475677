"""Which member of a stage group takes a microbatch (SWARM's rule): the one expected to finish it first, from its
measured throughput and the microbatches already queued on it; ties go to the smaller peer id, so a replayed
schedule routes alike. Stage 0's driver keeps one `Balancer` and pins each microbatch's whole path at launch.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_THROUGHPUT = 1e-3
"""Microbatches per second assumed for a member that has not measured any yet (all such members rank alike)."""


def expected_finish(queued: int, throughput: float) -> float:
    """Seconds until one more microbatch sent now would be done: (queued + 1) / throughput."""
    return (queued + 1) / max(throughput, MIN_THROUGHPUT)


def choose(members: Sequence[tuple[str, float]], queued: dict[str, int]) -> str:
    """The member (peer id, throughput) with the earliest expected finish; ties by peer id."""
    if not members:
        raise ValueError("no member to choose from")
    known = [t for _, t in members if t > 0]
    floor = min(known) if known else 1.0  # unmeasured members count as the slowest measured one
    return min(members, key=lambda m: (expected_finish(queued.get(m[0], 0), m[1] if m[1] > 0 else floor), m[0]))[0]


class Balancer:
    """Queue depths per member: `take` when a microbatch is routed through it, `release` when it completed."""

    def __init__(self) -> None:
        self.queued: dict[str, int] = {}

    def take(self, members: Sequence[tuple[str, float]]) -> str:
        peer = choose(members, self.queued)
        self.queued[peer] = self.queued.get(peer, 0) + 1
        return peer

    def release(self, peers: Sequence[str]) -> None:
        for p in peers:
            left = self.queued.get(p, 0) - 1
            if left > 0:
                self.queued[p] = left
            else:
                self.queued.pop(p, None)

    def clear(self) -> None:
        self.queued.clear()
