"""Two adjacent middle stages SIGKILLed in the same step: both are rebuilt from the nearest surviving stages
(1 and 4 of 4), weighted by gradient norm and distance — the documented formula (docs/recovery.md):

    W_i = (a * W_next + b * W_prev) / (a + b),  a = (|g_next| + 1e-4) / d_next,  b = (|g_prev| + 1e-4) / d_prev

— never from each other, even when one finishes first; then training resumes."""

from __future__ import annotations

import os

import pytest
import torch

from tests.support.swarm import Harness, fetch_weights, kill_group, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault, pytest.mark.slow]  # ~70 s; run with -m slow


def formula(prev: dict, nxt: dict, n_prev: float, n_next: float, d_prev: int, d_next: int) -> dict:
    a, b = (n_next + 1e-4) / d_next, (n_prev + 1e-4) / d_prev
    return {k: ((a * nxt[k].double() + b * prev[k].double()) / (a + b)).float() for k in prev}


def test_two_adjacent_middle_stages_rebuilt_from_the_survivors_by_distance(make_harness, tmp_path) -> None:
    audit_dir = str(tmp_path / "audit")
    h: Harness = make_harness("adjacent", stages=4, extra=("--audit-recovery", audit_dir))
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(5)]
    infos = [h.ready_info(n) for n in nodes]
    head = nodes[0]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 6, 180, "6 steps before the fault")
    spares = [h.start_node(f"spare{i}") for i in range(2)]
    wait_until(lambda: all(h.events(s, "standby") for s in spares), 90, "both spares on STANDBY")

    waiting = lambda: {e["stage"] for e in h.events(head, "waiting_for_stage")}  # noqa: E731
    kill_group(nodes[2])
    kill_group(nodes[3])
    for victim in (nodes[2], nodes[3]):
        victim.popen.wait(timeout=10)
    wait_until(lambda: waiting() & {2, 3}, 60, "stage 0 to pause for the lost stages")
    paused = len(steps())
    (meta1, w1), (meta4, w4) = fetch_weights([infos[1], infos[4]], identity=h.reader_identity)
    assert meta1["step"] == meta4["step"] == paused

    infos_new = {h.ready_info(s, timeout_s=120)["stage"] for s in spares}
    assert infos_new == {2, 3}
    n1, n4 = meta1["grad_norm"], meta4["grad_norm"]
    for stage, d_prev, d_next in ((2, 1, 2), (3, 2, 1)):
        rec = torch.load(os.path.join(audit_dir, f"recovery-stage{stage}-gen2.pt"))
        assert rec["how"] == "grad-avg" and rec["sources"] == {"prev": 1, "next": 4}, rec["sources"]
        assert rec["neighbours"]["prev"]["distance"] == d_prev and rec["neighbours"]["next"]["distance"] == d_next
        want = formula(w1, w4, n1, n4, d_prev, d_next)
        assert set(rec["result"]) == set(want)
        for key, t in want.items():
            assert torch.equal(rec["result"][key], t), (stage, key)

    wait_until(lambda: len(steps()) >= paused + 8, 240, "8 steps after both rebuilds")
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
    finished = [e for s in spares for e in h.events(s, "recovery_finished")]
    assert all(e["degraded"] for e in finished) and len(finished) == 2
