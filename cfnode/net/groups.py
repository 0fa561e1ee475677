"""Stage groups (docs/architecture.md "Stage groups"): the pure rules on a view that decide which group a node
joins and when a member must step down. A stage's group is `SwarmView.group(i)`: its ONLINE members at the
highest ONLINE generation. The member that built or rebuilt the stage founded that generation; the others joined
it by copying a member's exact state (`StageRecord.joined_from`) and keep its generation.
"""

from __future__ import annotations

from cfnode.net.records import PeerRecord, StageState, SwarmView, is_alive, is_occupied, swarm_has_trained


def group_ids(view: SwarmView, stage_idx: int) -> tuple[str, ...]:
    return tuple(p.peer_id for p in view.group(stage_idx))


def group_throughput(members: tuple[PeerRecord, ...]) -> float:
    """A group's measured throughput: the sum of its members' (microbatches per second each)."""
    return sum(max(0.0, p.record.throughput) for p in members)


def group_to_join(view: SwarmView, num_stages: int, replicas: int, wanted: int | None = None) -> int | None:
    """The live group a newcomer joins when no stage is empty, or None when every group has `replicas` members
    (or `wanted`'s group is full or empty). Among the transformer stages Petals' rule: the group with the least
    measured throughput, then the smaller group, then the lower index. Stage 0's group only when every
    transformer group is full (or `wanted` is 0): its members share the embeddings and heads, but stage 0's
    throughput is not measured, so it cannot be compared with the others'."""
    if replicas <= 1:
        return None
    candidates = range(1, num_stages + 1) if wanted is None else [wanted]
    best: tuple[float, int, int] | None = None
    for idx in candidates:
        members = view.group(idx)
        if not 1 <= len(members) < replicas:
            continue
        key = (group_throughput(members), len(members), idx)
        if best is None or key < best:
            best = key
    if best is None and wanted is None and 1 <= len(view.group(0)) < replicas:
        return 0
    return None if best is None else best[2]


def step_down_reason(view: SwarmView, stage_idx: int, peer_id: str, generation: int, *, joined_from: str,
                     replicas: int) -> str | None:
    """Why an ONLINE member must stop serving its stage now, or None.

    One peer per stage (`replicas == 1`): whenever the view's owner is somebody else. In groups: when another
    peer is ONLINE at a higher generation (the stage was rebuilt without us), or when we founded our generation
    and so did another peer whose id sorts first (two rebuilds that raced: the one with the smaller id keeps
    it). A member that joined by exact copy shares its generation with the founder and stays."""
    online = [p for p in view.members(stage_idx) if p.record.state is StageState.ONLINE and p.peer_id != peer_id]
    if replicas <= 1:
        owner = view.online_owner(stage_idx)
        if owner is not None and owner.peer_id != peer_id:
            return f"held by {owner.peer_id[:12]} at generation {owner.record.generation}"
        return None
    higher = [p for p in online if p.record.generation > generation]
    if higher:
        top = max(higher, key=lambda p: p.record.generation)
        return f"rebuilt by {top.peer_id[:12]} at generation {top.record.generation}"
    if not joined_from:
        rivals = sorted(p.peer_id for p in online if p.record.generation == generation and not p.record.joined_from)
        if rivals and rivals[0] < peer_id:
            return f"founded at generation {generation} by {rivals[0][:12]} too"
    return None


def stage_to_move_to(view: SwarmView, num_stages: int, stage_idx: int, peer_id: str, *, replicas: int,
                     start_step: int = 0) -> int | None:
    """Rebalancing (CheckFree only when a group is empty): the empty transformer stage this member should leave
    its group for and rebuild, or None. Only when no spare waits to do it, only from the largest group (ties: the
    lowest stage), never its last member, and only the member whose id sorts last, so one peer moves."""
    if replicas <= 1 or stage_idx == 0 or not swarm_has_trained(view, num_stages, start_step):
        return None
    if any(is_alive(p.expiration_time, view.now) and p.record.state is StageState.STANDBY for p in view.standby):
        return None
    empty = [i for i in range(1, num_stages + 1) if not is_occupied(view.members(i), view.now)]
    if not empty:
        return None
    sizes = {i: len(view.group(i)) for i in range(1, num_stages + 1)}
    largest = min(sizes, key=lambda i: (-sizes[i], i))
    group = group_ids(view, stage_idx)
    if largest != stage_idx or sizes[largest] < 2 or not group or max(group) != peer_id:
        return None
    return empty[0]


def without_confirmed_lost(view: SwarmView) -> SwarmView:
    """The view without the ONLINE records of groups that stage 0's owner reports confirmed lost (`StageRecord.
    lost`: every member failed a ping): their stage reads as empty before the records expire. Stage 0's own
    records are never dropped, and a report about a generation older than a stage's records drops nothing."""
    owner0 = view.online_owner(0)
    if owner0 is None or not owner0.record.lost:
        return view
    lost: dict[int, int] = {}
    for stage, generation in owner0.record.lost:
        if stage != 0:
            lost[stage] = max(lost.get(stage, 0), generation)
    stages = {i: tuple(p for p in ps if not (i in lost and p.record.state is StageState.ONLINE
                                             and p.record.generation <= lost[i]))
              for i, ps in view.stages.items()}
    return SwarmView(stages=stages, standby=view.standby, now=view.now)
