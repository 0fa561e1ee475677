"""SIGTERM is a graceful leave (an OFFLINE record: the spare takes over at once, without waiting for the
ttl); a spare killed in the middle of a rebuild is replaced by another spare that completes it."""

from __future__ import annotations

import signal

import pytest

from tests.support.swarm import Harness, kill_group, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]
TTL_S = 8.0


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("leave", stages=3, ttl_s=TTL_S)


def _form(h: Harness) -> list:
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
    for n in nodes:
        h.ready_info(n)
    wait_until(lambda: len(h.events(nodes[0], "step")) >= 5, 180, "5 steps")
    return nodes


def test_sigterm_leave_is_taken_over_without_waiting_for_the_ttl(harness: Harness) -> None:
    h = harness
    nodes = _form(h)
    spare = h.start_node("spare")
    wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")
    nodes[2].popen.send_signal(signal.SIGTERM)
    assert nodes[2].popen.wait(timeout=30) == 0, "a graceful leave exits 0"
    assert any(e["event"] == "left" for e in h.events(nodes[2]))
    claimed = wait_until(lambda: h.events(spare, "claimed"), 30, "the spare to claim stage 2")[0]
    assert claimed["stage"] == 2, claimed
    # Stage 2 was freed by the leaver's OFFLINE record, not by its heartbeat record expiring: each neighbour
    # (stages 1 and 3) saw the OFFLINE record when it found stage 2 without a live owner (`how="left"`; a
    # record that ran out reads `how="expired"`). That a stage with only an OFFLINE member is claimable at
    # once is tests/unit/test_claim.py's part.
    for neighbour in (nodes[1], nodes[3]):
        lost = wait_until(lambda n=neighbour: [e for e in h.events(n, "neighbour_lost") if e["stage"] == 2], 30,
                          f"{neighbour.name} to notice that stage 2 left")
        assert {e["how"] for e in lost} == {"left"}, lost
    wait_until(lambda: h.events(spare, "recovery_finished"), 60, "the rebuild")
    before = len(h.events(nodes[0], "step"))
    wait_until(lambda: len(h.events(nodes[0], "step")) >= before + 5, 120, "training to go on")


@pytest.mark.slow  # ~60 s; the harness kills rebuilding nodes in-process
def test_spare_killed_mid_rebuild_is_replaced_by_another(harness: Harness) -> None:
    h = harness
    nodes = _form(h)
    slow = h.start_node("slow-spare", "--debug-recovery-stall", "60")
    wait_until(lambda: h.events(slow, "standby"), 120, "the first spare to wait as STANDBY")
    kill_group(nodes[2])
    wait_until(lambda: h.events(slow, "recovery_started"), 60, "the first spare to start rebuilding")
    other = h.start_node("other-spare")
    kill_group(slow)  # dies after fetching, before installing
    slow.popen.wait(timeout=10)
    done = wait_until(lambda: h.events(other, "recovery_finished"), 120, "the second spare to finish")[0]
    assert done["stage"] == 2 and done["how"] == "grad-avg"
    assert not h.events(slow, "recovery_finished"), "the first spare must not have finished"
    before = len(h.events(nodes[0], "step"))
    wait_until(lambda: len(h.events(nodes[0], "step")) >= before + 5, 120, "training to go on")
