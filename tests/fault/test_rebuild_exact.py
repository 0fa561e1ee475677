"""Kill -9 a middle stage with no spare around: the swarm waits; a node started later rebuilds the stage and
the rebuilt tensors are exactly the CheckFree rule applied to the survivors' tensors and norms, which the
recovery did not touch. Run for both crash shapes: the whole process group, and the main PID only."""

from __future__ import annotations

import math
import os
import signal
import statistics

import pytest
import torch

from tests.support.swarm import Harness, fetch_weights, kill_group, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("exact", stages=3)


def checkfree(prev: dict, nxt: dict, prev_norm: float, next_norm: float) -> dict:
    a, b = next_norm + 1e-4, prev_norm + 1e-4
    return {k: ((a * nxt[k].double() + b * prev[k].double()) / (a + b)).float() for k in prev}


@pytest.mark.parametrize("crash", ["process_group", pytest.param("main_pid", marks=pytest.mark.slow)])
def test_late_joiner_rebuilds_exactly_and_training_recovers(harness: Harness, tmp_path, crash: str) -> None:
    h = harness
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
    infos = [h.ready_info(n) for n in nodes]
    head, victim = nodes[0], nodes[2]
    steps = lambda: h.events(head, "step")  # noqa: E731
    waits = lambda: [e for e in h.events(head, "waiting_for_stage") if e["stage"] == 2]  # noqa: E731
    wait_until(lambda: len(steps()) >= 8, 180, "8 steps before the fault")
    waits_before = len(waits())

    if crash == "process_group":
        kill_group(victim)
    else:
        os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait(timeout=10)
    wait_until(lambda: len(waits()) > waits_before, 60, "stage 0 to pause for the lost stage 2")
    paused_at = len(steps())
    (meta1, w1), (meta3, w3) = fetch_weights([infos[1], infos[3]], identity=h.reader_identity)  # the survivors, while paused
    assert meta1["step"] == meta3["step"] == paused_at, "survivors hold the last committed step"

    audit = str(tmp_path / "audit")
    late = h.start_node("late", "--audit-recovery", audit)
    info = h.ready_info(late, timeout_s=120)
    assert info["stage"] == 2 and info["generation"] == 2
    assert len(steps()) == paused_at, "nothing commits while stage 2 is missing"

    record = torch.load(os.path.join(audit, "recovery-stage2-gen2.pt"))
    assert record["how"] == "grad-avg" and record["sources"] == {"prev": 1, "next": 3}
    prev, nxt = record["neighbours"]["prev"], record["neighbours"]["next"]
    assert prev["grad_norm"] == meta1["grad_norm"] and nxt["grad_norm"] == meta3["grad_norm"]
    for key in w1:  # the donors are the survivors' weights, untouched by serving them
        assert torch.equal(prev["state"][key], w1[key]) and torch.equal(nxt["state"][key], w3[key]), key
    expected = checkfree(w1, w3, meta1["grad_norm"], meta3["grad_norm"])
    assert set(record["result"]) == set(expected)
    for key, t in expected.items():
        assert torch.equal(record["result"][key], t), key

    wait_until(lambda: len(steps()) >= paused_at + 30, 240, "30 steps after the rebuild")
    after = [e["loss"] for e in steps()[paused_at:paused_at + 30]]
    assert all(math.isfinite(x) for x in after)
    assert statistics.mean(after[-5:]) < statistics.mean(after[:5]), after
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
