"""What the members of each stage group held: every member's weights and Adam state right after it applied a step
(and a newcomer's right after its exact copy), compared with `torch.equal` against the first member's state at
the same (stage, generation, step). Members of a group apply the same averaged gradient with the same Adam
state, so any difference is a violation (invariants.py `[identical]`).

Only the first state per (stage, generation, step) is kept; every later one is compared on the spot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cfnode.testing.clock import virtual_now


class Member(Protocol):
    """What is read of a harness node (cluster.py `HarnessNode`)."""

    name: str
    node: Any


@dataclass
class StateRecorder:
    reference: dict[tuple[int, int, int], tuple[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    """(stage, generation, step) -> (the member first seen there, its state)."""
    mismatches: list[str] = field(default_factory=list)
    compared: int = 0
    """States compared with another member's (a group of one compares nothing)."""
    seen: dict[tuple[int, int, int], list[str]] = field(default_factory=dict)
    """(stage, generation, step) -> every member recorded there (by name, in order)."""

    def note(self, h: Member, why: str) -> None:
        node = h.node
        worker = node.worker
        if worker is None or node.stage is None:
            return
        meta, state = worker.export_state()
        key = (int(node.stage), int(node.generation), int(meta["step"]))
        names = self.seen.setdefault(key, [])
        if h.name not in names:
            names.append(h.name)
        ref = self.reference.get(key)
        if ref is None:
            self.reference[key] = (h.name, state)
            return
        first, ref_state = ref
        if first == h.name:
            return
        self.compared += 1
        differ = sorted(n for n in set(ref_state) | set(state)
                        if n not in ref_state or n not in state or not torch.equal(ref_state[n], state[n]))
        if differ:
            self.mismatches.append(f"t={virtual_now():.3f} stage {key[0]} generation {key[1]} step {key[2]}: "
                                   f"{h.name} ({why}) differs from {first} in {len(differ)} tensor(s), e.g. "
                                   f"{', '.join(differ[:3])}")

    def groups_seen(self) -> int:
        """(stage, generation, step) at which two or more members were recorded."""
        return sum(1 for names in self.seen.values() if len(names) > 1)


@dataclass
class GroupSizes:
    """How large each stage's group ever was: in the DHT's ground truth (sampled by the runner) and among the
    participants of every committed step (read at stage 0's `step` event)."""

    replicas: int
    over: list[str] = field(default_factory=list)
    largest: dict[int, int] = field(default_factory=dict)
    participants: list[tuple[float, int, dict[int, tuple[str, ...]]]] = field(default_factory=list)
    """(virtual time, step, stage -> members by name) of every committed step."""

    def _check(self, stage: int, members: tuple[str, ...], where: str, name_of: Any) -> None:
        self.largest[stage] = max(self.largest.get(stage, 0), len(members))
        if len(members) > self.replicas:
            self.over.append(f"t={virtual_now():.3f} stage {stage}'s group had {len(members)} members > "
                             f"{self.replicas} ({where}): {', '.join(name_of(p) for p in members)}")

    def sample_view(self, view: Any, num_stages: int, name_of: Any) -> None:
        for i in range(num_stages + 1):
            self._check(i, tuple(p.peer_id for p in view.group(i)), "the DHT's records", name_of)

    def sample_participants(self, participants: dict[int, tuple[str, ...]], step: int, name_of: Any) -> None:
        for i, members in sorted(participants.items()):
            self._check(i, tuple(members), f"the participants of step {step}", name_of)
        self.participants.append((virtual_now(), step, {i: tuple(name_of(p) for p in ms)
                                                         for i, ms in sorted(participants.items())}))


@dataclass(frozen=True)
class GroupFacts:
    """What a groups scenario leaves for its checks (picklable: it crosses from a worker process)."""

    compared: int
    """Member states compared with another member's at the same (stage, generation, step)."""
    largest: dict[int, int]
    participants: list[tuple[float, int, dict[int, tuple[str, ...]]]]
    peer_ids: dict[str, str]
    """Node name -> peer id."""
