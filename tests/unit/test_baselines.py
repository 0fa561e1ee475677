"""The baselines' pure parts: who keeps whose copy (recovery/replicas.py), the checkpoint store's layout and
completeness rule (recovery/store.py), and a stage's checkpoint round trip (StageWorker)."""

from __future__ import annotations

import os

import pytest
import torch

from cfnode.config import PRESETS
from cfnode.model.stages import build_stage
from cfnode.recovery import store
from cfnode.recovery.replicas import replica_of, replica_targets, replica_turn
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker


@pytest.mark.parametrize("num", [3, 4, 6])
def test_redundant_every_stage_is_kept_by_its_ring_predecessor(num: int) -> None:
    for stage in range(num + 1):
        [holder] = replica_targets(stage, num, "redundant")
        assert holder == (stage - 1) % (num + 1)
        assert replica_of(holder, num, "redundant") == stage
    assert replica_targets(1, num, "redundant") == (0,) and replica_targets(0, num, "redundant") == (num,)


def test_checkfree_plus_only_stage_zero_has_copies_on_one_and_l() -> None:
    assert replica_targets(0, 4, "checkfree+") == (1, 4)
    assert [replica_turn(0, 4, "checkfree+", after) for after in (None, 1, 4)] == [(1,), (4,), (1,)]
    assert replica_turn(2, 4, "redundant", None) == replica_targets(2, 4, "redundant") == (1,)
    assert replica_turn(1, 4, "checkfree+", None) == ()
    assert [replica_targets(i, 4, "checkfree+") for i in range(1, 5)] == [()] * 4
    assert [replica_of(i, 4, "checkfree+") for i in range(5)] == [None, 0, None, None, 0]
    for mode in ("checkfree", "checkpoint"):
        assert all(replica_targets(i, 4, mode) == () and replica_of(i, 4, mode) is None for i in range(5))


@pytest.mark.parametrize(("step", "every", "expected"), [(0, 10, False), (10, 10, True), (15, 10, False),
                                                         (20, 10, True), (3, 1, True), (5, 0, False)])
def test_checkpoint_steps(step: int, every: int, expected: bool) -> None:
    assert store.is_checkpoint_step(step, every) is expected


def test_only_complete_checkpoints_count(tmp_path) -> None:
    root = str(tmp_path)
    assert store.latest_complete(root) == 0 and store.latest_complete(None) == 0
    for step in (10, 20):
        for stage in range(3):
            store.save_stage(root, step, stage, {"step": step, "stage": stage})
    store.mark_complete(root, 10, 2)
    store.save_stage(root, 30, 0, {"step": 30})  # stage 0 saved step 30, the others never did
    assert store.latest_complete(root) == 10
    store.mark_complete(root, 20, 2)
    assert store.latest_complete(root) == 20
    with pytest.raises(FileNotFoundError, match=r"lacks stages \[1, 2\]"):
        store.mark_complete(root, 30, 2)
    assert store.latest_complete(root) == 20
    assert not [f for f in os.listdir(store.step_dir(root, 20)) if ".tmp" in f]  # atomic writes leave no temp file
    assert store.load_stage(root, 20, 1) == {"step": 20, "stage": 1}


def _trained_worker(stage: int, *, seed: int = 0, steps: int = 2) -> StageWorker:
    cfg = PRESETS["tiny"]
    w = StageWorker(build_stage(cfg, stage), stage_idx=stage, lr=1e-2, clip_norm=1.0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        key = AttemptKey(step, 1)
        w.begin(key)
        for mb in range(2):
            x = torch.randn(2, cfg.seq_len, cfg.hidden_size, generator=g)
            w.forward(key, mb, x)
            w.backward(key, mb, torch.randn(2, cfg.seq_len, cfg.hidden_size, generator=g))
        w.commit(key, 2)
    return w


def test_checkpoint_round_trip_restores_weights_and_adam_exactly(tmp_path) -> None:
    w = _trained_worker(1)
    store.save_stage(str(tmp_path), w.step, 1, w.checkpoint_payload())
    saved = {k: t.clone() for k, t in w.module.state_dict().items()}
    moments = {k: v.clone() for k, v in w.optimizer.state_dict()["state"][0].items()}
    other = _trained_worker(1, seed=7, steps=5)  # a stage that trained on other data, further
    assert not torch.equal(other.module.state_dict()["layers.0.mlp.up_proj.weight"],
                           saved["layers.0.mlp.up_proj.weight"])
    other.begin(AttemptKey(5, 1))  # with an attempt in progress
    other.restore(store.load_stage(str(tmp_path), 2, 1), step=2, fresh={})
    assert other.step == 2 and other.active is None and other.stash == {}
    for k, t in saved.items():
        assert torch.equal(other.module.state_dict()[k], t), k
    for k, v in moments.items():
        assert torch.equal(other.optimizer.state_dict()["state"][0][k], v), k
    with pytest.raises(ValueError, match="holds step 2, expected 4"):
        other.restore(store.load_stage(str(tmp_path), 2, 1), step=4, fresh={})


def test_restore_to_step_zero_is_the_seeded_init() -> None:
    w = _trained_worker(2)
    fresh = build_stage(PRESETS["tiny"], 2).state_dict()
    w.restore(None, step=0, fresh=fresh)
    assert w.step == 0 and len(w.optimizer.state) == 0
    assert all(torch.equal(w.module.state_dict()[k], t) for k, t in fresh.items())


def test_after_a_rollback_attempts_from_before_it_never_start_again() -> None:
    """A late hop of the aborted attempt (step 57) must not become active after the swarm rolled back to 50."""
    w = _trained_worker(1)
    w.begin(AttemptKey(57, 1000))
    w.restore(None, step=0, fresh=build_stage(PRESETS["tiny"], 1).state_dict(), attempt_floor=1005)
    assert w.begin(AttemptKey(57, 1000)) == 0 and w.active is None  # the late hop is ignored
    w.begin(AttemptKey(50, 1006))
    assert w.active == AttemptKey(50, 1006)
