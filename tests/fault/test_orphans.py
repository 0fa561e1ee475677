"""kill -9 of a node's main process only: its DHT child and p2pd exit by themselves (the parent-death
watchdog), and a restart with the same identity joins again and rebuilds the (edge) stage it finds empty."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.support.swarm import Harness, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("orphans", stages=2)


def _group(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return out


def test_kill_main_pid_leaves_no_orphans_and_identity_can_rejoin(harness: Harness, tmp_path) -> None:
    h = harness
    h.start_bootstrap()
    identity = str(tmp_path / "stage2.id")
    nodes = [h.start_node("node0", "--stage", "0"), h.start_node("node1", "--stage", "1"),
             h.start_node("node2", "--stage", "2", "--identity-path", identity)]
    infos = [h.ready_info(n) for n in nodes]
    head, victim = nodes[0], nodes[2]
    wait_until(lambda: len(h.events(head, "step")) >= 5, 180, "5 steps")
    children = _group(victim.popen.pid)
    assert len(children) >= 3, f"expected main, DHT child and p2pd in the group, got {children}"

    os.kill(victim.popen.pid, signal.SIGKILL)  # the main PID only: DHT child and p2pd are orphaned
    victim.popen.wait(timeout=10)
    wait_until(lambda: not _group(victim.popen.pid), 20, "the orphaned DHT child and p2pd to exit")

    again = h.start_node("node2-again", "--identity-path", identity)
    info = h.ready_info(again, timeout_s=120)
    assert info["peer_id"] == infos[2]["peer_id"], "same identity, same peer id"
    assert info["stage"] == 2
    rebuilt = h.events(again, "recovery_finished")
    assert rebuilt and rebuilt[0]["how"] == "copy(prev)" and rebuilt[0]["degraded"] is True
    # a new generation above the dead node's 1 (2, or 3 when the first try was refused: a donor that had not yet
    # read the claimant's record refuses its fetch, `recovery_failed`, and the claim is retried)
    assert rebuilt[0]["generation"] >= 2 and info["generation"] == rebuilt[0]["generation"]
    assert len(h.events(again, "recovery_failed")) == rebuilt[0]["generation"] - 2
    before = len(h.events(head, "step"))
    wait_until(lambda: len(h.events(head, "step")) >= before + 5, 120, "training to resume")
