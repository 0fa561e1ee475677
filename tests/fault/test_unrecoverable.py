"""Stage 0 (embedding, head, data) lost before CheckFree+: an explicit unrecoverable state. Survivors log it
once, nobody rebuilds stage 0 from nothing, `cfnode status` shows it, and nothing hangs."""

from __future__ import annotations

import json

import pytest

from tests.support.swarm import Harness, kill_group, metric, run_cli, scrape, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]
MESSAGE = "cannot be rebuilt without checkfree+"


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("nostage0", stages=2)


@pytest.mark.slow  # ~50-80 s; claim.py/watch.py decisions have unit tests
def test_stage0_loss_is_an_explicit_unrecoverable_state(harness: Harness) -> None:
    h = harness
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(3)]
    infos = [h.ready_info(n) for n in nodes]
    wait_until(lambda: len(h.events(nodes[0], "step")) >= 5, 180, "5 steps")
    spare = h.start_node("spare")
    wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")

    kill_group(nodes[0])
    nodes[0].popen.wait(timeout=10)
    for node in (nodes[1], nodes[2], spare):
        wait_until(lambda n=node: h.events(n, "unrecoverable"), 60, f"{node.name} to report stage 0 lost")

    snap = wait_until(lambda: _status(h), 60, "status to show the unrecoverable state", poll_s=1)
    assert snap["unrecoverable"] is True and 0 in snap["empty_stages"]
    assert not h.events(spare, "claimed"), "a spare must not rebuild stage 0 from a fresh init"
    for node, info in ((nodes[1], infos[1]), (nodes[2], infos[2])):
        log = open(node.log_path, encoding="utf-8").read()
        assert log.count(MESSAGE) == 1, f"{node.name} must log the unrecoverable state exactly once"
        assert metric(scrape(info["metrics_port"]), "cfnode_swarm_unrecoverable") == 1
        assert node.alive()


def _status(h: Harness) -> dict | None:
    out = run_cli("status", "--peers", h.bootstrap_maddr, "--run-id", h.run_id, "--json", "--heartbeat-ttl", "3")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    return snap if snap["unrecoverable"] else None
