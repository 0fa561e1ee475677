"""`--compute-dtype bfloat16` in a real swarm on 127.0.0.1 (bootstrap + stage 0 + two transformer stages, OS
processes, tiny preset): it trains, and the compute dtype is run-wide (a float32 joiner is refused naming the
flag). The autocast itself is checked in-process against transformers in tests/unit/test_device.py."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest

from tests.support.swarm import Harness, run_cli, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.slow]


def test_bfloat16_swarm_trains_and_refuses_a_float32_joiner(make_harness: Callable[..., Harness]) -> None:
    h = make_harness("bf16", extra=("--compute-dtype", "bfloat16"))
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(3)]
    for node in nodes:
        h.ready_info(node)
    steps = wait_until(lambda: (s := h.events(nodes[0], "step")) and len(s) >= 20 and s, 240, "20 committed steps")
    losses = [e["loss"] for e in steps[:20]]
    assert [e["step"] for e in steps[:20]] == list(range(1, 21)), "steps must commit once each, in order"
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < first - 0.3, f"loss did not fall: first five {losses[:5]}, last five {losses[-5:]}"

    args = h.join_args()
    args[args.index("--compute-dtype") + 1] = "float32"
    out = run_cli(*args, timeout_s=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--compute-dtype bfloat16" in out.stderr and "--compute-dtype float32" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
