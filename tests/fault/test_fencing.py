"""A stage holder frozen (SIGSTOP) past the heartbeat ttl is replaced; when it thaws it sees the higher
generation owned by another peer and steps down to STANDBY, and its neighbours never accept it again."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.swarm import Harness, metric, scrape, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("fence", stages=3)


def test_stale_owner_steps_down_after_thawing(harness: Harness) -> None:
    h = harness
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
    infos = {n.name: h.ready_info(n) for n in nodes}
    head, old = nodes[0], nodes[2]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 5, 180, "5 steps before the freeze")
    spare = h.start_node("spare")
    wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")

    os.kill(old.popen.pid, signal.SIGSTOP)  # the main process freezes: no heartbeats, no RPCs
    rebuilt = wait_until(lambda: h.events(spare, "recovery_finished"), 120, "the spare to rebuild stage 2")[0]
    assert rebuilt["stage"] == 2 and rebuilt["generation"] == 2
    resumed_at = len(steps())
    wait_until(lambda: len(steps()) >= resumed_at + 3, 120, "training with the new stage 2")

    os.kill(old.popen.pid, signal.SIGCONT)
    fenced = wait_until(lambda: h.events(old, "fenced"), 60, "the thawed owner to fence itself")[0]
    assert fenced["stage"] == 2 and fenced["generation"] == 2
    wait_until(lambda: h.events(old, "standby"), 60, "the thawed owner to become a spare")
    thawed_at = len(steps())
    wait_until(lambda: len(steps()) >= thawed_at + 5, 120, "training to go on after the thaw")
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
    old_metrics = scrape(infos["node2"]["metrics_port"])
    assert metric(old_metrics, "cfnode_stage_state", state="standby") == 1
    assert metric(old_metrics, "cfnode_stage_index") == -1
    assert old.alive() and spare.alive()
