"""The torch side of one stage (cfnode.train.worker.StageWorker) on real tiny stages."""

from __future__ import annotations

import math

import pytest
import torch

from cfnode.config import PRESETS
from cfnode.model.stages import HeadStage, build_stage
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

CFG = PRESETS["tiny"]
B = 2
T = 8  # shorter than CFG.seq_len keeps the tests fast; the stages are position-agnostic up to seq_len
M = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_worker(stage_idx: int, *, lr: float = 1e-2, clip_norm: float = 1.0) -> StageWorker:
    return StageWorker(build_stage(CFG, stage_idx), stage_idx=stage_idx, lr=lr, clip_norm=clip_norm)


def hidden(seed: int) -> torch.Tensor:
    return torch.randn(B, T, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def params(w: StageWorker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in w.module.named_parameters()}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_block_attempt(w: StageWorker, key: AttemptKey, m: int = M, *, grad_scale: float = 1.0,
                      backward: int | None = None) -> None:
    """Forward all m microbatches, then backward the first `backward` (default all) of them."""
    w.begin(key)
    for mb in range(m):
        out = w.forward(key, mb, hidden(10 * key.step + mb))
        assert out.shape == (B, T, CFG.hidden_size) and not out.requires_grad
    for mb in range(m if backward is None else backward):
        g = w.backward(key, mb, grad_scale * hidden(1000 + mb))
        assert g.shape == (B, T, CFG.hidden_size)
        assert bool(torch.isfinite(g).all())


# -- transformer stage ---------------------------------------------------------------------------------------


def test_block_stage_step_commits() -> None:
    w = make_worker(1, clip_norm=1e9)
    before = params(w)
    key = AttemptKey(0, 0)
    run_block_attempt(w, key)
    assert w.backward_done == M
    assert all(p.grad is not None for p in w.module.parameters())
    post, raw = w.commit(key, M)
    assert w.step == 1
    assert (w.grad_norm, w.grad_norm_raw) == (post, raw)
    assert raw > 0 and math.isfinite(raw)
    assert post == pytest.approx(raw, rel=1e-5)  # clip not reached: post == raw
    assert not same_params(before, params(w))
    assert all(p.grad is None for p in w.module.parameters())
    assert w.stash == {} and w.active is None
    # next step continues from the committed step
    key2 = AttemptKey(1, 0)
    run_block_attempt(w, key2)
    w.commit(key2, M)
    assert w.step == 2


@pytest.mark.parametrize("clip", [1e-3, 0.05, 1.0, 1e6])
def test_block_stage_clipping(clip: float) -> None:
    w = make_worker(2, clip_norm=clip)
    key = AttemptKey(5, 1)
    run_block_attempt(w, key, grad_scale=10.0)
    post, raw = w.commit(key, M)
    assert post <= clip + 1e-5
    assert post == pytest.approx(min(raw, clip), rel=1e-4)
    assert w.step == 6


def test_commit_before_all_backward_passes_fails_and_keeps_weights() -> None:
    w = make_worker(1)
    before = params(w)
    key = AttemptKey(0, 0)
    run_block_attempt(w, key, backward=M - 1)
    with pytest.raises(ValueError, match="backward"):
        w.commit(key, M)
    assert same_params(before, params(w))
    assert w.step == 0
    assert w.active == key  # the attempt can still finish
    w.backward(key, M - 1, hidden(7))
    w.commit(key, M)
    assert w.step == 1


def test_commit_for_non_active_key_fails() -> None:
    w = make_worker(1)
    before = params(w)
    with pytest.raises(ValueError):
        w.commit(AttemptKey(0, 0), M)  # nothing active
    key = AttemptKey(0, 1)
    run_block_attempt(w, key)
    for other in (AttemptKey(0, 0), AttemptKey(0, 2), AttemptKey(1, 1)):
        with pytest.raises(ValueError):
            w.commit(other, M)
    assert same_params(before, params(w))
    assert w.step == 0


def test_begin_newer_drops_stash_and_grads() -> None:
    w = make_worker(3)
    old = AttemptKey(4, 0)
    w.begin(old)
    for mb in range(3):
        w.forward(old, mb, hidden(mb))
    w.backward(old, 0, hidden(50))  # one backward done: grads exist, 2 stash entries left
    assert any(p.grad is not None for p in w.module.parameters())
    new = AttemptKey(4, 1)
    assert w.begin(new) == 2
    assert w.active == new
    assert w.stash == {}
    assert w.backward_done == 0
    assert all(p.grad is None for p in w.module.parameters())
    assert not w.accepts(old) and w.accepts(new)
    # the dropped microbatches are gone
    with pytest.raises(KeyError):
        w.backward(old, 1, hidden(51))
    # a later step also supersedes
    assert w.begin(AttemptKey(5, 0)) == 0
    assert w.active == AttemptKey(5, 0)


@pytest.mark.parametrize("older", [AttemptKey(3, 9), AttemptKey(4, 1), AttemptKey(4, 2)])
def test_begin_older_or_same_is_noop(older: AttemptKey) -> None:
    w = make_worker(1)
    current = AttemptKey(4, 2)
    w.begin(current)
    w.forward(current, 0, hidden(0))
    w.forward(current, 1, hidden(1))
    w.backward(current, 0, hidden(2))
    grads = {n: p.grad.clone() for n, p in w.module.named_parameters() if p.grad is not None}
    assert grads
    assert w.begin(older) == 0
    assert w.active == current
    assert len(w.stash) == 1 and w.backward_done == 1
    assert all(torch.equal(p.grad, grads[n]) for n, p in w.module.named_parameters() if n in grads)
    w.backward(current, 1, hidden(3))  # the current attempt continues
    w.commit(current, 2)
    assert w.step == 5


def test_backward_of_unknown_microbatch_raises_key_error() -> None:
    w = make_worker(1)
    key = AttemptKey(0, 0)
    w.begin(key)
    w.forward(key, 0, hidden(0))
    with pytest.raises(KeyError):
        w.backward(key, 1, hidden(1))
    w.backward(key, 0, hidden(1))
    with pytest.raises(KeyError):  # a duplicate backward
        w.backward(key, 0, hidden(1))
    assert w.backward_done == 1


def test_eval_forward_no_grad_and_matches_training_forward() -> None:
    w = make_worker(1)
    x = hidden(3)
    y = w.eval_forward(x)
    assert not y.requires_grad
    assert all(p.grad is None for p in w.module.parameters())
    key = AttemptKey(0, 0)
    w.begin(key)
    assert torch.allclose(w.forward(key, 0, x), y, atol=1e-6)


# -- stage 0 -------------------------------------------------------------------------------------------------


def test_head_stage_cycle() -> None:
    w = make_worker(0)
    assert isinstance(w.module, HeadStage) and w.is_head
    before = params(w)
    key = AttemptKey(0, 0)
    w.begin(key)
    losses = []
    for mb in range(M):
        tokens = ids(mb)
        h = w.embed(key, mb, tokens)
        assert h.shape == (B, T, CFG.hidden_size) and not h.requires_grad
        # in the ring h would pass through stages 1..L; the head only needs a hidden state of the same shape
        loss, grad = w.head_backward(key, mb, h + 0.1 * hidden(mb), ids(100 + mb), M)
        assert math.isfinite(loss)
        assert loss == pytest.approx(math.log(CFG.vocab_size), rel=0.2)  # near-uniform at init
        assert grad.shape == h.shape and bool(torch.isfinite(grad).all())
        assert float(grad.abs().sum()) > 0
        losses.append(loss)
        w.embed_backward(key, mb, grad)
    m = w.module
    assert m.embed_tokens.weight.grad is not None and float(m.embed_tokens.weight.grad.abs().sum()) > 0
    assert m.lm_head.weight.grad is not None and float(m.lm_head.weight.grad.abs().sum()) > 0
    assert m.norm.weight.grad is not None
    # only the rows of the tokens that were embedded get embedding gradient
    used = torch.unique(torch.cat([ids(mb).flatten() for mb in range(M)]))
    row_has_grad = m.embed_tokens.weight.grad.abs().sum(dim=1) > 0
    assert set(torch.nonzero(row_has_grad).flatten().tolist()) == set(used.tolist())
    post, raw = w.commit(key, M)
    assert math.isfinite(post) and math.isfinite(raw)
    assert post <= w.clip_norm + 1e-5
    assert w.step == 1
    assert not same_params(before, params(w))


def test_head_backward_scales_by_num_microbatches() -> None:
    grads = []
    for m in (1, 4):
        w = make_worker(0)
        key = AttemptKey(0, 0)
        w.begin(key)
        h = w.embed(key, 0, ids(0))
        _loss, g = w.head_backward(key, 0, h, ids(1), m)
        grads.append(g)
    assert torch.allclose(grads[0], 4 * grads[1], rtol=1e-4, atol=1e-7)


def test_eval_loss_finite_and_creates_no_grads() -> None:
    w = make_worker(0)
    h = w.eval_embed(ids(0))
    assert not h.requires_grad
    loss = w.eval_loss(h, ids(1))
    assert isinstance(loss, float) and math.isfinite(loss)
    assert all(p.grad is None for p in w.module.parameters())
    # and it equals the training loss of the same batch
    key = AttemptKey(0, 0)
    w.begin(key)
    train_loss, _ = w.head_backward(key, 0, w.embed(key, 0, ids(0)), ids(1), 1)
    assert train_loss == pytest.approx(loss, rel=1e-5)


# -- snapshot / install --------------------------------------------------------------------------------------


def test_snapshot_returns_clones() -> None:
    w = make_worker(1)
    snap = w.snapshot()
    assert snap.keys() == w.module.state_dict().keys()
    before = params(w)
    for t in snap.values():
        t.add_(1.0)
    assert same_params(before, params(w))
    # and later training does not change an earlier snapshot
    snap2 = w.snapshot()
    frozen = {k: v.clone() for k, v in snap2.items()}
    key = AttemptKey(0, 0)
    run_block_attempt(w, key)
    w.commit(key, M)
    assert all(torch.equal(snap2[k], frozen[k]) for k in snap2)


def test_install_loads_weights_and_resets_optimizer() -> None:
    donor = make_worker(2)
    key = AttemptKey(0, 0)
    run_block_attempt(donor, key)
    donor.commit(key, M)
    state = donor.snapshot()

    w = make_worker(1, lr=1e-2)
    key = AttemptKey(0, 0)
    run_block_attempt(w, key)
    w.commit(key, M)
    assert len(w.optimizer.state) > 0  # Adam moments exist
    w.begin(AttemptKey(1, 0))
    w.forward(AttemptKey(1, 0), 0, hidden(0))  # a partial attempt in progress

    w.install(state, step=17, lr=3e-4)
    assert all(torch.equal(w.module.state_dict()[k], state[k]) for k in state)
    assert w.step == 17 and w.lr == 3e-4
    assert len(w.optimizer.state) == 0
    assert [g["lr"] for g in w.optimizer.param_groups] == [3e-4]
    opt_params = [p for g in w.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len(list(w.module.parameters()))
    assert all(a is b for a, b in zip(opt_params, w.module.parameters(), strict=True))
    assert w.stash == {} and w.active is None and w.backward_done == 0
    # the installed state is copied, not aliased
    state[next(iter(state))].add_(1.0)
    assert not torch.equal(w.module.state_dict()[next(iter(state))], state[next(iter(state))])
    # and training continues from the installed step with the new optimizer
    nxt = AttemptKey(17, 0)
    run_block_attempt(w, nxt)
    w.commit(nxt, M)
    assert w.step == 18
    assert len(w.optimizer.state) > 0


def test_install_rejects_mismatched_state() -> None:
    w = make_worker(1)
    state = w.snapshot()
    state.pop(next(iter(state)))
    with pytest.raises(RuntimeError):
        w.install(state, step=3, lr=1e-3)


def test_a_rebuilt_stage_is_no_donor_until_its_first_commit() -> None:
    w = make_worker(2)
    assert w.donor
    w.install(make_worker(3).snapshot(), step=5, lr=1e-3)
    assert not w.donor
    key = AttemptKey(5, 0)
    run_block_attempt(w, key)
    w.commit(key, M)
    assert w.donor


def test_store_replica_keeps_the_newest_push() -> None:
    w = make_worker(1)
    assert (w.replica, w.replica_step) == (None, -1)
    head = make_worker(0).snapshot()
    assert w.store_replica(head, step=4, grad_norm=0.5, grad_norm_raw=2.0)
    assert w.replica is head and w.replica_step == 4 and w.replica_norms == (0.5, 2.0)
    older = {k: t + 1 for k, t in head.items()}
    assert not w.store_replica(older, step=3, grad_norm=0.1, grad_norm_raw=0.1)
    assert w.replica is head and w.replica_step == 4
    assert w.store_replica(older, step=5, grad_norm=0.1, grad_norm_raw=0.1) and w.replica is older
