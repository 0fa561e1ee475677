"""Stage 0's routing of one attempt over the stage groups: who takes part (every unbanned member of each group
when the attempt starts: they all average and apply, even one no microbatch went through), the member of each
stage every microbatch's path pins (train/balancer.py), stage 0's member it starts and ends at (its origin, when
stage 0 takes part), and how many microbatches each member processed (its weight in the group's all-reduce).
With one peer per stage every path is the ring's owners and every origin the lead.
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
        self.routes: dict[tuple[str, int], tuple[int, ...]] = {}
        self.origins: dict[tuple[str, int], str] = {}
        """(kind, microbatch) -> the member of stage 0's group that embeds it and computes its loss."""

    def start(self, members: Mapping[int, Sequence[tuple[str, float]]]) -> None:
        """A new attempt over these members (stage -> (peer id, throughput), lead first)."""
        self.balancer.clear()
        self.participants = {i: tuple(p for p, _ in ms) for i, ms in members.items()}
        self.throughput = {p: t for ms in members.values() for p, t in ms}
        self.paths.clear()
        self.samples.clear()
        self.routes.clear()
        self.origins.clear()

    def pin(self, kind: str, mb: int, route: Sequence[int], banned: set[str] | None = None) -> list[str]:
        """The member of each stage of `route` for this microbatch, chosen by expected finish time (and its origin,
        when stage 0 takes part: it is not on the route)."""
        if kind == "train" and 0 in self.participants:
            self.origins[(kind, mb)] = self._take(0)
        path = []
        for stage in route:
            candidates = [(p, self.throughput.get(p, 0.0)) for p in self.participants[stage]
                          if not banned or p not in banned]
            peer = self.balancer.take(candidates)
            path.append(peer)
            if kind == "train":
                self.samples[(stage, peer)] = self.samples.get((stage, peer), 0) + 1
        self.paths[(kind, mb)] = path
        self.routes[(kind, mb)] = tuple(route)
        return list(path)

    def _take(self, stage: int) -> str:
        """A member of `stage` for one more training microbatch (counted in its samples)."""
        peer = self.balancer.take([(p, self.throughput.get(p, 0.0)) for p in self.participants[stage]])
        self.samples[(stage, peer)] = self.samples.get((stage, peer), 0) + 1
        return peer

    def path(self, kind: str, mb: int) -> list[str]:
        return list(self.paths[(kind, mb)])

    def origin(self, kind: str, mb: int) -> str | None:
        """The member of stage 0's group microbatch `mb` starts and ends at (None: not pinned)."""
        return self.origins.get((kind, mb))

    def stage_of(self, peer: str) -> int | None:
        """The stage `peer` takes part in this attempt as (None: it does not)."""
        return next((i for i, ms in self.participants.items() if peer in ms), None)

    def can_drop(self, peer: str) -> bool:
        """`peer` takes part and its group has another participant to take its microbatches; for stage 0 it is
        a follower (the lead, listed first, drives the attempt)."""
        stage = self.stage_of(peer)
        if stage is None or len(self.participants[stage]) < 2:
            return False
        return stage != 0 or self.participants[0][0] != peer

    def drop(self, peer: str) -> list[int]:
        """A member lost mid-attempt: it leaves its stage's participants (it neither averages nor applies), and
        every training microbatch whose path (or, for stage 0, whose origin) was it, finished or not, is pinned
        to another member of that group instead (its other stages stay). Returns those microbatches, to be sent
        again."""
        stage = self.stage_of(peer)
        assert stage is not None and self.can_drop(peer)
        self.participants[stage] = tuple(p for p in self.participants[stage] if p != peer)
        self.balancer.queued.pop(peer, None)
        moved = []
        for (kind, mb), path in sorted(self.paths.items()):
            route = self.routes[(kind, mb)]
            if kind != "train":
                continue
            if stage == 0 and self.origins.get((kind, mb)) == peer:
                self.origins[(kind, mb)] = self._take(0)
            elif stage != 0 and stage in route and path[route.index(stage)] == peer:
                path[route.index(stage)] = self._take(stage)
            else:
                continue
            moved.append(mb)
        self.samples.pop((stage, peer), None)
        return moved

    def done(self, kind: str, mb: int) -> None:
        """The microbatch is back at stage 0: its members' queues shrink."""
        path = self.paths.get((kind, mb))
        if path is not None:
            origin = self.origins.get((kind, mb))
            self.balancer.release(path + ([origin] if origin is not None else []))

    def group(self, stage: int) -> list[str]:
        return list(self.participants.get(stage, ()))

    def samples_of(self, stage: int, peer: str) -> int:
        return self.samples.get((stage, peer), 0)
