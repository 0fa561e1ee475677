"""`--wire-dtype` in a real swarm on 127.0.0.1 (bootstrap + stage 0 + two transformer stages, OS processes,
tiny preset): it trains, and every hop crossed the wire in the bytes its wire dtype declares (float16 and
bfloat16 half of float32, uint8 a quarter plus its codebook), measured at sender and receiver. The codec itself is
checked in-process in tests/unit/test_wire.py."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest

from cfnode.config import preset
from tests.support.swarm import Harness, metric, scrape, wait_until

pytestmark = [pytest.mark.loopback]

MODEL = preset("tiny", num_stages=2)
NUMEL = 4 * MODEL.seq_len * MODEL.hidden_size  # --microbatch-size 4 (the harness)
HOP_BYTES = {"float16": 2 * NUMEL, "bfloat16": 2 * NUMEL, "uint8": NUMEL + 8 + 4 * 256}
STEPS = 12


@pytest.mark.parametrize("wire_dtype", [
    "float16", pytest.param("bfloat16", marks=pytest.mark.slow), pytest.param("uint8", marks=pytest.mark.slow)])
def test_a_swarm_trains_with_compressed_hops_of_the_declared_size(make_harness: Callable[..., Harness],
                                                                  wire_dtype: str) -> None:
    h = make_harness(f"wire-{wire_dtype}", extra=("--wire-dtype", wire_dtype))
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i), *(("--debug-hold-at-step", str(STEPS)) if i == 0 else ()))
             for i in range(3)]
    infos = [h.ready_info(node) for node in nodes]
    wait_until(lambda: h.events(nodes[0], "held"), 240, f"{STEPS} committed steps")
    steps = h.events(nodes[0], "step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    losses = [e["loss"] for e in steps]
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3]) - 0.3, losses
    for info in infos:  # stage 0, 1 and 2: what each sent, per hop, and what its successors read
        samples = scrape(info["metrics_port"])
        for method, kind in (("forward", "activations"), ("backward", "gradients")):
            sent = metric(samples, "cfnode_transfer_bytes_total", direction="sent", kind=kind)
            pushes = metric(samples, "cfnode_rpc_duration_seconds_count", method=method, side="client")
            # every push counted (a refused one too: a stale hop after an abort) and every acked one's bytes
            acked, rest = divmod(sent, HOP_BYTES[wire_dtype])
            assert rest == 0 and 4 * STEPS <= acked <= pushes, (info["stage"], method, sent, pushes)
        received = sum(metric(samples, "cfnode_transfer_bytes_total", direction="received", kind=k)
                       for k in ("activations", "gradients"))
        hops = metric(samples, "cfnode_rpc_requests_total", method="forward", result="ok") + metric(
            samples, "cfnode_rpc_requests_total", method="backward", result="ok")
        assert hops >= 8 * STEPS and received == hops * HOP_BYTES[wire_dtype], (info["stage"], received, hops)
