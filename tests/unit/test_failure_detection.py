"""node/watch.py `Watch` counts neighbour losses exactly: once per incident, only for a neighbour seen ONLINE since this
node went ONLINE (a stage that never had an owner, e.g. at start-up, is not a failure), again after it was back.
`cfnode_stage_failures_detected_total{neighbor}` and the `neighbour_lost` events must agree."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from cfnode.config import NodeConfig, preset
from cfnode.metrics import NodeMetrics
from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView
from cfnode.node.watch import Watch

NOW = 1000.0


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    def names(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.seen if e == name]


def holder(stage: int, num_stages: int = 3) -> SimpleNamespace:
    """A stage holder as Watch sees it (ONLINE on `stage`); `node.watch` is its Watch."""

    async def unreachable(peer_id: str) -> bool:
        return False

    node = SimpleNamespace(config=NodeConfig(model=preset("tiny", num_stages=num_stages)), metrics=NodeMetrics(),
                           events=Events(), stage=stage, state=StageState.ONLINE, peer_id=f"peer{stage}",
                           generation=0, joined_from="", fence=lambda: None, is_reachable=unreachable)
    node.watch = Watch(node)  # type: ignore[arg-type]
    return node


def view(*online: int, offline: tuple[int, ...] = ()) -> SwarmView:
    def rec(i: int, state: StageState) -> tuple[PeerRecord, ...]:
        return (PeerRecord(peer_id=f"peer{i}", record=StageRecord(state=state, step=5), expiration_time=NOW + 3),)

    stages = {i: rec(i, StageState.ONLINE) for i in online}
    stages.update({i: rec(i, StageState.OFFLINE) for i in offline})
    return SwarmView(stages=stages, now=NOW)


def watch(node: SimpleNamespace, v: SwarmView) -> None:
    asyncio.run(node.watch.on_view(v))


def failures(node: SimpleNamespace) -> dict[str, float]:
    c = node.metrics.stage_failures_detected
    return {side: c.labels(neighbor=side)._value.get() for side in ("prev", "next")}


def test_missing_neighbour_at_start_up_is_not_a_failure() -> None:
    node = holder(1)
    watch(node, view(0, 1))  # stage 2 has no owner yet
    watch(node, view(0, 1))
    assert failures(node) == {"prev": 0, "next": 0} and not node.events.names("neighbour_lost")
    watch(node, view(0, 1, 2))  # it joins: not a "neighbour_back" either
    assert not node.events.names("neighbour_back")


def test_each_incident_counts_once() -> None:
    node = holder(1)
    watch(node, view(0, 1, 2, 3))
    for _ in range(3):  # stage 2 expires and stays gone for three membership reads
        watch(node, view(0, 1, 3))
    assert failures(node) == {"prev": 0, "next": 1}
    assert node.events.names("neighbour_lost") == [{"stage": 2, "side": "next", "how": "expired"}]
    watch(node, view(0, 1, 2, 3))  # rebuilt
    assert node.events.names("neighbour_back") == [{"stage": 2, "side": "next"}]
    watch(node, view(1, 2, 3))  # stage 0 lost
    assert failures(node) == {"prev": 1, "next": 1}
    watch(node, view(0, 1, 3, offline=(2,)))  # stage 2 lost again (it left), stage 0 back
    assert failures(node) == {"prev": 1, "next": 2}
    assert node.events.names("neighbour_lost")[-1] == {"stage": 2, "side": "next", "how": "left"}
    counted = sum(failures(node).values())
    assert counted == len(node.events.names("neighbour_lost")) == 3


def test_the_kill_of_a_middle_stage_counts_once_on_each_side() -> None:
    """L = 3: killing stage 2 is seen by stage 1 (its next) and stage 3 (its prev), not by stage 0."""
    nodes = {i: holder(i) for i in (0, 1, 3)}
    for n in nodes.values():
        watch(n, view(0, 1, 2, 3))
        watch(n, view(0, 1, 3))
        watch(n, view(0, 1, 3))
    assert {i: failures(n) for i, n in nodes.items()} == {
        0: {"prev": 0, "next": 0}, 1: {"prev": 0, "next": 1}, 3: {"prev": 1, "next": 0}}


def test_a_node_not_online_counts_nothing() -> None:
    node = holder(1)
    watch(node, view(0, 1, 2, 3))
    node.state = StageState.RECOVERING
    watch(node, view(0, 1, 3))
    assert failures(node) == {"prev": 0, "next": 0}
