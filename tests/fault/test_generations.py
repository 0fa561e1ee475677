"""Generations never repeat for a stage: three successive rebuilds of stage 2 by spares that joined only after
the previous holder's record had expired (so no live record and no spare's memory holds the old generation)
get strictly increasing generations, from the neighbours' memory carried in their records. Before issue 10 a
rebuild took the highest generation among live records, plus one, and reused generation 1 every time."""

from __future__ import annotations

import pytest

from tests.support.swarm import Harness, kill_group, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault, pytest.mark.slow]  # ~2-3 min: run with -m slow


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("gens", stages=3)


def test_three_rebuilds_get_strictly_increasing_generations(harness: Harness) -> None:
    h = harness
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
    for n in nodes:
        h.ready_info(n)
    head, neighbour = nodes[0], nodes[1]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 3, 180, "3 steps")
    holder, generations = nodes[2], []
    for round_ in range(3):
        kill_group(holder)
        holder.popen.wait(timeout=10)
        # the holder's record has expired once its neighbour reports the loss as an expiry
        wait_until(lambda r=round_: len([e for e in h.events(neighbour, "neighbour_lost")
                                         if e["stage"] == 2 and e["how"] == "expired"]) > r,
                   60, f"stage 1 to see stage 2's record expire (round {round_})")
        spare = h.start_node(f"spare{round_}")
        done = wait_until(lambda s=spare: h.events(s, "recovery_finished"), 120, f"rebuild {round_}")[0]
        assert done["stage"] == 2
        generations.append(done["generation"])
        before = len(steps())
        wait_until(lambda b=before: len(steps()) >= b + 2, 120, f"training after rebuild {round_}")
        holder = spare
    assert generations == sorted(set(generations)) and generations[0] >= 2, generations
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
