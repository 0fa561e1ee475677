"""Stage 0's routing of one attempt over the stage groups: who takes part (every unbanned member of each group
when the attempt starts: they all average and apply, even one no microbatch went through), the member of each
stage every microbatch's path pins (train/balancer.py), and how many microbatches each member processed (its
weight in the group's all-reduce). With one peer per stage every path is the ring's owners.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cfnode.train.balancer import Balancer


class AttemptPaths:
    def __init__(self) -> None:
        self.balancer = Balancer()
        self.participants: dict[int, tuple[str, ...]] = {}
        self.throughput: dict[str, float] = {}
        self.paths: dict[tuple[str, int], list[str]] = {}
        """(kind, microbatch) -> the member of each stage on its route, in route order."""
        self.samples: dict[tuple[int, str], int] = {}
        """(stage, member) -> training microbatches routed through it this attempt."""

    def start(self, members: Mapping[int, Sequence[tuple[str, float]]]) -> None:
        """A new attempt over these members (stage -> (peer id, throughput), lead first)."""
        self.balancer.clear()
        self.participants = {i: tuple(p for p, _ in ms) for i, ms in members.items()}
        self.throughput = {p: t for ms in members.values() for p, t in ms}
        self.paths.clear()
        self.samples.clear()

    def pin(self, kind: str, mb: int, route: Sequence[int], banned: set[str] | None = None) -> list[str]:
        """The member of each stage of `route` for this microbatch, chosen by expected finish time."""
        path = []
        for stage in route:
            candidates = [(p, self.throughput.get(p, 0.0)) for p in self.participants[stage]
                          if not banned or p not in banned]
            peer = self.balancer.take(candidates)
            path.append(peer)
            if kind == "train":
                self.samples[(stage, peer)] = self.samples.get((stage, peer), 0) + 1
        self.paths[(kind, mb)] = path
        return path

    def done(self, kind: str, mb: int) -> None:
        """The microbatch is back at stage 0: its members' queues shrink."""
        path = self.paths.get((kind, mb))
        if path is not None:
            self.balancer.release(path)

    def group(self, stage: int) -> list[str]:
        return list(self.participants.get(stage, ()))

    def samples_of(self, stage: int, peer: str) -> int:
        return self.samples.get((stage, peer), 0)
