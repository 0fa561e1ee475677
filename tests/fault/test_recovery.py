"""Kill -9 a stage holder of a live swarm and watch the swarm pause, rebuild the stage with CheckFree from
its neighbours (a STANDBY spare claims it), and carry on training. Real processes, real SIGKILL."""

from __future__ import annotations

import pytest

from tests.support.swarm import Harness, kill_group, metric, scrape, tail, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("fault", stages=3)


def _form(h: Harness) -> dict[int, tuple]:
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
    infos = [h.ready_info(n) for n in nodes]
    return {info["stage"]: (node, info) for node, info in zip(nodes, infos, strict=True)}


def test_middle_stage_killed_is_rebuilt_by_a_spare_and_training_continues(harness: Harness) -> None:
    h = harness
    by_stage = _form(h)
    head = by_stage[0][0]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 8, 180, "8 committed steps before the fault")
    spare = h.start_node("spare")
    wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")

    victim = by_stage[2][0]
    kill_group(victim)  # the whole machine dies: main process, DHT child and p2pd
    victim.popen.wait(timeout=10)
    assert not victim.alive()
    killed_at_step = len(steps())

    finished = wait_until(lambda: h.events(spare, "recovery_finished"), 120, "the spare to rebuild stage 2")[0]
    assert finished["stage"] == 2 and finished["how"] == "grad-avg" and finished["degraded"] is False
    assert finished["sources"] == {"prev": 1, "next": 3}
    assert finished["generation"] == 2 and finished["step"] >= killed_at_step - 1
    wait_until(lambda: len(steps()) >= killed_at_step + 8, 180, "8 more steps after the rebuild")

    head_events = h.events(head)
    # The kill lands either before the step's decision (the attempt aborts and is retried with the same data)
    # or after it (stage 2's apply is retried until its record is gone, then the step counts as committed and
    # stage 2 is rebuilt from neighbours that applied it): both are the fault seen by stage 0.
    aborted = [e for e in head_events if e["event"] == "step_aborted"]
    unconfirmed = [e for e in head_events if e["event"] == "commit_failed" and e["stage"] == 2]
    assert aborted or unconfirmed, "stage 0 must have seen the fault: an aborted attempt or an unconfirmed apply"
    waiting = [e for e in head_events if e["event"] == "waiting_for_stage"]
    assert [e["stage"] for e in waiting].count(2) >= 1
    log0 = open(head.log_path, encoding="utf-8").read()
    assert log0.count("stage 2 lost; waiting for a node to rebuild it") == 1, tail(head.log_path)
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1)), "every step commits exactly once, in order"
    samples = scrape(by_stage[0][1]["metrics_port"])
    issued = metric(samples, "cfnode_microbatches_issued_total")
    done = metric(samples, "cfnode_microbatches_committed_total")
    dropped = sum(v for (name, _), v in samples.items() if name == "cfnode_microbatches_dropped_total")
    assert issued > 0 and issued - done <= dropped + 4 and done + dropped >= issued - 4, (issued, done, dropped)
    spare_samples = scrape(h.ready_info(spare)["metrics_port"])
    assert metric(spare_samples, "cfnode_recoveries_total", role="recovered", rule="grad-avg",
                  result="success") == 1
    assert metric(spare_samples, "cfnode_stage_index") == 2
