"""CheckFree+'s stage-0 replicas are streamed off the step's critical path (train/commit.py, `apply_all`): the
next step trains while they travel, and its two holders take turns (`replica_turn`: step 1 to stage 1, step 2 to
stage L, ...). The fresher of the two copies is then stage 0's last committed step or the one before, the
other one step older (never older than that, never out of order), and at a hold and at the end of a run both are
exactly the last step. Run on the local engine (the real nodes in one process, virtual time), so the
interleaving is replayable."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cfnode.experiment.localrun import run_local
from cfnode.recovery.replicas import replica_turn
from tests.support.swarm import Harness

L, STEPS = 4, 8
HOLDERS = (1, L)


def holder_of(step: int) -> int:
    """Who gets the copy of `step` in a run without skipped steps: stage 1 first, then they take turns."""
    after = None
    for _ in range(step):
        [after] = replica_turn(0, L, "checkfree+", after)
    return after


def test_replica_holders_take_turns_lag_stage0_by_one_and_two_steps_and_end_on_its_last(tmp_path) -> None:
    seen: list[tuple[int, dict[int, int]]] = []
    final: dict[str, Any] = {}

    def observe(cluster: Any, h: Any, event: str, fields: dict[str, Any]) -> None:
        if h.node.driver is None or event not in ("step", "training_finished"):
            return
        holders = {i: cluster.serving(i).node.worker for i in HOLDERS}
        if event == "step":
            seen.append((int(fields["step"]), {i: w.replica_step for i, w in holders.items()}))
        else:
            final.update(step=int(fields["step"]), weights=h.node.worker.snapshot(),
                         held={i: (w.replica_step, dict(w.held[0])) for i, w in holders.items()})

    h = Harness(str(tmp_path), "replicas", stages=L, extra=("--recovery", "checkfree+"))
    run = run_local(h.run_args("--max-steps", str(STEPS), "--val-every", "0"), num_stages=L, spares=0,
                    observers=[observe])
    assert run.exit_code == 0 and not run.crashes, (run.exit_code, run.crashes)
    assert [s for s, _ in seen] == list(range(1, STEPS + 1))
    for step, held in seen:  # as stage 0 reports step s, its copy of s is on its way, s - 1 and s - 2 are in
        want = {i: -1 for i in HOLDERS} | {holder_of(s): s for s in (step - 2, step - 1) if s >= 1}
        assert held == want, (step, held)
    assert final["step"] == STEPS
    for i, (step, weights) in final["held"].items():  # the run's end sent the last copy to both, and waited
        assert step == STEPS, i
        assert weights.keys() == final["weights"].keys()
        for name, t in final["weights"].items():
            assert torch.equal(weights[name], t), (i, name)


def test_a_checkfree_plus_run_goes_on_after_stage0_losses_longer_ago_than_the_engines_patience(tmp_path) -> None:
    """The local engine gives up on a swarm that stays unrecoverable for SETTLE_S (60 s virtual); a lost stage 0
    counts only until a spare serves it again from its replica, as checkfree+ does. A slow heartbeat (ttl 24 s)
    makes three stage-0 losses last longer than that."""
    from cfnode.experiment.localrun import SETTLE_S, LocalKill, losses_by_step

    kills = [LocalKill(stage=0, step=s) for s in (3, 6, 9)]
    h = Harness(str(tmp_path), "stage0", stages=L, extra=("--recovery", "checkfree+"), ttl_s=24.0, period_s=6.0)
    run = run_local(h.run_args("--max-steps", "12", "--val-every", "0", "--step-timeout", "60"), num_stages=L,
                    spares=1, kills=kills)
    assert run.exit_code == 0 and not run.crashes, (run.exit_code, run.crashes)
    assert [(k["stage"], k["killed_at_step"]) for k in run.kills] == [(0, 3), (0, 6), (0, 9)]
    assert run.virtual_s - run.kills[0]["ts"] > SETTLE_S  # the engine would have stopped before the fix
    rebuilt = [(e["stage"], e["how"]) for e in run.events if e["event"] == "recovery_finished"]
    assert rebuilt == [(0, "replica")] * 3, rebuilt
    assert sorted(losses_by_step(run.events)) == list(range(1, 13))


@pytest.mark.parametrize("whose", ["turn", "other"])
def test_a_push_cut_short_at_the_end_is_sent_again_so_both_holders_end_on_the_last_step(tmp_path,
                                                                                       whose: str) -> None:
    """At the end of a run stage 0 brings every holder to the last step: the one whose turn it was not, and one
    whose own push of it was cut short (seen with hivemind under load); a catch-up push cut short gets one more
    try."""
    turn = holder_of(STEPS)
    victim_stage = turn if whose == "turn" else next(i for i in HOLDERS if i != turn)
    cuts: list[int] = []
    final: dict[str, Any] = {}

    def cut_once(phase: str, call: Any, *, victim: str) -> None:
        if phase == "before" and call.method == "replica" and call.dst == victim and not cuts:
            cuts.append(call.seq)
            raise ConnectionError("stream cut short (injected)")

    def observe(cluster: Any, h: Any, event: str, fields: dict[str, Any]) -> None:
        if h.node.driver is None:
            return
        if event == "step" and int(fields["step"]) == STEPS:  # the last step's copy is on its way to `turn`
            victim = cluster.serving(victim_stage).peer_id
            cluster.net.hooks.append(lambda phase, call: cut_once(phase, call, victim=victim))
        if event == "training_finished":
            final.update(weights=h.node.worker.snapshot(),
                         held={i: (cluster.serving(i).node.worker.replica_step,
                                   dict(cluster.serving(i).node.worker.held[0])) for i in HOLDERS})

    h = Harness(str(tmp_path), "replicas-cut", stages=L, extra=("--recovery", "checkfree+"))
    run = run_local(h.run_args("--max-steps", str(STEPS), "--val-every", "0"), num_stages=L, spares=0,
                    observers=[observe])
    assert run.exit_code == 0 and not run.crashes, (run.exit_code, run.crashes)
    assert len(cuts) == 1  # the fault fired
    assert [(e["to_stage"], e["step"]) for e in run.events if e["event"] == "replica_failed"] == [
        (victim_stage, STEPS)]
    for i, (step, weights) in final["held"].items():
        assert step == STEPS, i
        for name, t in final["weights"].items():
            assert torch.equal(weights[name], t), (i, name)
