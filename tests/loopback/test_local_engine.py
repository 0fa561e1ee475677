"""`cfnode experiment --engine local` computes what a real swarm computes: one schedule with two failures under
CheckFree+ (stage 3, a middle stage rebuilt by grad-avg from stages 2 and 4, after step 10; stage 5, an edge
stage rebuilt by copying its swap partner 4, after step 25), run once by real processes on 127.0.0.1 (SIGKILL
while the victim holds a microbatch of the next step, `--debug-kill-mid-step`) and once by the local engine
(experiment/localrun.py: the same nodes in one process, the kill at the instant stage 0 logs the step). Every
step's loss agrees within 1e-5 and every rebuilt stage is `torch.equal` to its swarm twin."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from cfnode.experiment.localrun import LocalKill, losses_by_step, run_local
from tests.support.swarm import Harness, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]  # ~45-55 s here: 9 processes start on 2 cores

L, STEPS = 5, 40
KILLS = (LocalKill(stage=3, step=10), LocalKill(stage=5, step=25))


def audits(directory: str) -> dict[int, dict]:
    """The `--audit-recovery` dumps by rebuilt stage (their generations count claims, which differ)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        payload = torch.load(os.path.join(directory, name))
        assert payload["stage"] not in out, name  # each stage rebuilt once
        out[payload["stage"]] = payload
    return out


def test_the_local_engine_matches_a_real_swarm_step_for_step(make_harness: Callable[..., Harness],
                                                             tmp_path) -> None:
    swarm_audit, local_audit = str(tmp_path / "audit-swarm"), str(tmp_path / "audit-local")
    # Heartbeats cost CPU (a node and its share of the bootstrap: ~4 % of a core at 1 s, ~6 % at 0.5 s), and
    # 9 processes share 2 cores. Stage 0 (it polls the ring while a stage is missing) beats every second, the
    # transformer stages every 2 s (a lost one is reported by stage 0, not by its record expiring), the spares
    # every 0.5 s: a spare's claim waits up to one period twice, so it takes the lost stage sooner.
    # (no validation passes: the comparison is of the training losses)
    h = make_harness("local-eq", stages=L, period_s=1.0,
                     extra=("--recovery", "checkfree+", "--microbatches", "2", "--val-every", "0"))
    h.start_bootstrap()
    victims = {k.stage: ("--debug-kill-mid-step", str(k.step)) for k in KILLS}
    slow = ("--heartbeat-period", "2.0", "--heartbeat-ttl", "6.0")
    nodes = [h.start_node(f"node{i}", "--stage", str(i), "--audit-recovery", swarm_audit,
                          *(("--max-steps", str(STEPS)) if i == 0 else (*slow, *victims.get(i, ()))))
             for i in range(L + 1)]
    # `--spare`: STANDBY until a stage is lost after training started, so the spares build with the ring
    spares = [h.start_node(f"spare{i}", "--spare", "--audit-recovery", swarm_audit, "--heartbeat-period", "0.5")
              for i in range(len(KILLS))]
    # The local engine (in this process, virtual time: its results cannot depend on the load) runs while the
    # swarm trains: it fills the cores the swarm leaves idle while it waits for claims and rebuilds.
    wait_until(lambda: h.events(nodes[0], "training_started"), 180, "the ring to start training")
    box: dict[str, Any] = {}

    def local_run() -> None:
        try:  # the local nodes all get the harness's heartbeat flags: in virtual time no result depends on timing
            box["run"] = run_local(h.run_args("--audit-recovery", local_audit, "--max-steps", str(STEPS)),
                                   num_stages=L, spares=2, kills=KILLS)
        except BaseException as e:  # reported in the test's thread
            box["error"] = e

    local_thread = threading.Thread(target=local_run, name="local-engine")
    local_thread.start()
    try:
        wait_until(lambda: h.events(nodes[0], "training_finished"), 240, f"stage 0 to finish {STEPS} steps")
    finally:
        local_thread.join()
    assert "error" not in box, box.get("error")
    local = box["run"]
    for k in KILLS:  # the faults fired: each victim SIGKILLed itself, and a spare rebuilt its stage
        assert nodes[k.stage].popen.wait(10) == -9, nodes[k.stage].name
    rebuilt = sorted((e["stage"], e["how"], e["step"]) for s in spares for e in h.events(s, "recovery_finished"))
    assert rebuilt == [(3, "grad-avg", 10), (5, "partner-copy", 25)], rebuilt
    swarm_losses = {e["step"]: e["loss"] for e in h.events(nodes[0], "step")}
    assert sorted(swarm_losses) == list(range(1, STEPS + 1))
    h.swarm.stop(grace_s=0.5)  # everything the comparison needs is on disk: no need to wait for graceful leaves
    assert local.exit_code == 0 and not local.crashes, (local.exit_code, local.crashes)
    assert [(k["stage"], k["killed_at_step"]) for k in local.kills] == [(3, 10), (5, 25)]
    local_rebuilt = sorted((e["stage"], e["how"], e["step"]) for e in local.events
                           if e["event"] == "recovery_finished")
    assert local_rebuilt == rebuilt
    local_losses = losses_by_step(local.events)
    assert sorted(local_losses) == sorted(swarm_losses)
    worst = max(abs(local_losses[s] - swarm_losses[s]) for s in swarm_losses)
    assert worst <= 1e-5, {s: (swarm_losses[s], local_losses[s]) for s in swarm_losses}

    got, want = audits(local_audit), audits(swarm_audit)
    assert sorted(got) == sorted(want) == [3, 5], (sorted(got), sorted(want))
    for name in want:  # what each rebuilt node installed, from which donors at which step, weighed how
        mine, theirs = got[name], want[name]
        assert (mine["how"], mine["step"], mine["sources"]) == (theirs["how"], theirs["step"], theirs["sources"])
        assert {s: n["grad_norm"] for s, n in mine["neighbours"].items()} == {
            s: n["grad_norm"] for s, n in theirs["neighbours"].items()}, name
        assert set(mine["result"]) == set(theirs["result"]), name
        for key, tensor in theirs["result"].items():
            assert torch.equal(mine["result"][key], tensor), f"{name}: {key}"
