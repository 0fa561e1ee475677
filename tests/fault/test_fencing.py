"""A stage holder frozen (SIGSTOP) past the heartbeat ttl is replaced; when it thaws it sees that another peer
owns its stage and steps down to STANDBY at its first membership read, whichever of the two peer ids sorts
first, and its neighbours never accept it again. Before issue 10, a holder whose peer id sorted first could
win the tie at an equal generation and take the ring back to its pre-freeze weights."""

from __future__ import annotations

import os
import signal

import pytest
from hivemind.p2p import P2P, PeerID

from tests.support.swarm import Harness, metric, scrape, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("fence", stages=3)


def _identities(directory: str) -> tuple[str, str]:
    """Two identity files, the one whose peer id sorts first first."""
    paths = []
    for name in ("a.id", "b.id"):
        path = os.path.join(directory, name)
        P2P.generate_identity(path)
        with open(path, "rb") as f:
            paths.append((PeerID.from_identity(f.read()).to_base58(), path))
    return tuple(p for _, p in sorted(paths))  # type: ignore[return-value]


@pytest.mark.parametrize("old_sorts_first", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_stale_owner_steps_down_after_thawing(harness: Harness, tmp_path, old_sorts_first: bool) -> None:
    h = harness
    low, high = _identities(str(tmp_path))
    old_identity, spare_identity = (low, high) if old_sorts_first else (high, low)
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i), *(("--identity-path", old_identity) if i == 2 else ()))
             for i in range(4)]
    infos = {n.name: h.ready_info(n) for n in nodes}
    head, old = nodes[0], nodes[2]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 5, 180, "5 steps before the freeze")
    spare = h.start_node("spare", "--identity-path", spare_identity)
    wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")

    os.kill(old.popen.pid, signal.SIGSTOP)  # the main process freezes: no heartbeats, no RPCs
    rebuilt = wait_until(lambda: h.events(spare, "recovery_finished"), 120, "the spare to rebuild stage 2")[0]
    # the initial holders run at generation 1; the rebuild at 2, or one more per refused try (a donor fetched in
    # the middle of a commit, or one that had not read the claimant's record yet: `recovery_failed`, retried)
    assert rebuilt["stage"] == 2 and rebuilt["generation"] >= 2
    assert len(h.events(spare, "recovery_failed")) == rebuilt["generation"] - 2
    spare_id = h.ready_info(spare)["peer_id"]
    assert (infos["node2"]["peer_id"] < spare_id) is old_sorts_first
    resumed_at = len(steps())
    wait_until(lambda: len(steps()) >= resumed_at + 3, 120, "training with the new stage 2")
    events_before_thaw = len(h.events(old))

    os.kill(old.popen.pid, signal.SIGCONT)
    fenced = wait_until(lambda: h.events(old, "fenced"), 60, "the thawed owner to fence itself")[0]
    assert fenced["stage"] == 2 and fenced["generation"] == rebuilt["generation"] and fenced["by"] == spare_id[:12]
    wait_until(lambda: h.events(old, "standby"), 60, "the thawed owner to become a spare")
    after_thaw = [e["event"] for e in h.events(old)[events_before_thaw:]]
    assert "online" not in after_thaw, after_thaw  # it never served stage 2 again
    thawed_at = len(steps())
    wait_until(lambda: len(steps()) >= thawed_at + 5, 120, "training to go on after the thaw")
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
    old_metrics = scrape(infos["node2"]["metrics_port"])
    assert metric(old_metrics, "cfnode_stage_state", state="standby") == 1
    assert metric(old_metrics, "cfnode_stage_index") == -1
    spare_metrics = scrape(h.ready_info(spare)["metrics_port"])
    assert metric(spare_metrics, "cfnode_stage_index") == 2
    assert metric(spare_metrics, "cfnode_stage_generation") == rebuilt["generation"]
    assert old.alive() and spare.alive()
