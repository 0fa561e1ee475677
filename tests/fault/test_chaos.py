"""Chaos: three rounds of SIGKILL of a random transformer stage's main PID only (its DHT child and p2pd are
left to the parent-death watchdog), at a random moment of a step, with spares waiting. Afterwards: stage 0's
committed steps are contiguous, each once; every live stage applied exactly the updates it committed (its
optimizer updates == committed steps since it was built); no process of a killed node is left."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.fault.test_orphans import _group  # live processes of a process group
from tests.support.swarm import Harness, metric, scrape, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault, pytest.mark.slow]
SEED = int(os.environ.get("CFNODE_CHAOS_SEED", "7"))


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("chaos", stages=3)


def test_three_random_main_pid_kills(harness: Harness) -> None:
    rng = random.Random(SEED)
    h = harness
    h.start_bootstrap()
    holders = {i: h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)}
    for n in holders.values():
        h.ready_info(n)
    head = holders[0]
    steps = lambda: h.events(head, "step")  # noqa: E731
    spares = [h.start_node(f"spare{i}") for i in range(2)]
    for s in spares:
        wait_until(lambda s=s: h.events(s, "standby"), 120, "spares to wait")
    wait_until(lambda: len(steps()) >= 3, 180, "3 steps")
    killed = []
    for round_ in range(3):
        stage = rng.randint(1, 3)
        victim = holders[stage]
        at = len(steps())
        wait_until(lambda a=at: len(steps()) > a, 120, "a step boundary")
        time.sleep(rng.uniform(0.0, 1.0))  # a random moment inside the next step (not a synchronisation)
        os.kill(victim.popen.pid, signal.SIGKILL)  # the main PID only
        victim.popen.wait(timeout=10)
        killed.append(victim)
        new = wait_until(lambda st=stage: next((s for s in spares if any(e["stage"] == st for e in
                                                                       h.events(s, "recovery_finished"))), None),
                         120, f"a spare to rebuild stage {stage} (round {round_})")
        spares.remove(new)
        holders[stage] = new
        spares.append(h.start_node(f"spare-r{round_}"))
        before = len(steps())
        wait_until(lambda b=before: len(steps()) >= b + 3, 180, f"training after round {round_}")
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1)), "each step once, in order"
    final = committed[-1]
    wait_until(lambda: len(steps()) > len(committed), 120, "one more step")  # every stage applied `final` now
    for stage, node in holders.items():
        m = scrape(h.ready_info(node)["metrics_port"])
        rebuilt = h.events(node, "recovery_finished")
        base = rebuilt[-1]["step"] if rebuilt else 0
        applied = metric(m, "cfnode_steps_committed_total")
        step = metric(m, "cfnode_training_step")
        assert step >= final and applied == step - base, (stage, node.name, base, applied, step)
    for victim in killed:
        wait_until(lambda v=victim: not _group(v.popen.pid), 30, f"{victim.name}'s DHT child and p2pd to exit")
