"""Microbatch gradients are summed in microbatch order whatever order they arrive in (train/accumulate.py), so a
stage trains the same bits however the network ordered its backward passes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from cfnode.config import PRESETS
from cfnode.model.stages import build_stage
from cfnode.train.accumulate import OrderedGrads
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

# float32 addition is not associative on these: (1e8 + 1) - 1e8 = 0, (1e8 - 1e8) + 1 = 1
VALUES = (1e8, 1.0, -1e8, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grads_of(mb: int) -> list[torch.Tensor]:
    return [torch.full((3,), VALUES[mb], dtype=torch.float32)]


def summed(order: tuple[int, ...]) -> torch.Tensor:
    p = nn.Parameter(torch.zeros(3))
    acc, seen = OrderedGrads(), set(range(len(VALUES)))  # every forward came first
    for mb in order:
        acc.add(mb, [p], grads_of(mb), seen)
    acc.flush()
    assert p.grad is not None and acc.waiting == 0
    return p.grad


def test_every_arrival_order_sums_the_same_bits_as_microbatch_order() -> None:
    in_order = summed((0, 1, 2, 3))
    naive = set()
    for order in itertools.permutations(range(4)):
        assert torch.equal(summed(order), in_order), order
        total = torch.zeros(3)
        for mb in order:
            total += grads_of(mb)[0]
        naive.add(float(total[0]))
    assert len(naive) > 1  # adding in arrival order would have given different bits


def test_without_a_seen_set_a_gradient_waits_for_every_smaller_microbatch() -> None:
    p = nn.Parameter(torch.zeros(1))
    acc = OrderedGrads()
    acc.add(2, [p], [torch.ones(1)], seen=None)
    acc.add(0, [p], [torch.ones(1)], seen=None)
    assert acc.waiting == 1 and float(p.grad[0]) == 1.0  # 2 waits for 1, whose forward may come late
    acc.add(1, [p], [torch.ones(1)], seen=None)
    assert acc.waiting == 0 and float(p.grad[0]) == 3.0


def test_a_group_member_waits_only_for_smaller_microbatches_seen_here() -> None:
    p = nn.Parameter(torch.zeros(1))
    acc = OrderedGrads()
    acc.add(2, [p], [torch.ones(1)], seen={0, 2})  # 0 was forwarded here, its backward is not in yet
    assert p.grad is None and acc.waiting == 1
    acc.add(5, [p], [torch.ones(1)], seen={0, 2, 5})
    assert acc.waiting == 2
    acc.add(0, [p], [torch.ones(1)], seen={0, 2, 5})
    assert acc.waiting == 0 and float(p.grad[0]) == 3.0
    acc.add(7, [p], [None], seen={6, 7})  # 6's backward never comes here: the commit flushes 7
    assert acc.waiting == 1
    acc.flush()
    assert acc.waiting == 0 and float(p.grad[0]) == 3.0  # None: 7 did not touch p


CFG = PRESETS["tiny"]


def hidden(seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(2, 8, CFG.hidden_size, generator=torch.Generator().manual_seed(seed))


def trained_grads(stage: int, order: tuple[int, ...], late_forward: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    w = StageWorker(build_stage(CFG, stage), stage_idx=stage, lr=1e-2, clip_norm=1e9)
    key = AttemptKey(0, 0)
    w.begin(key)
    m = len(order)
    ids = [torch.randint(0, CFG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(mb)) for mb in range(m)]
    if stage == 0:
        outs = [w.embed(key, mb, ids[mb]) for mb in range(m)]
        grads = {}
        for mb in order:  # the last stage's outputs come back in `order`, and so do the embedding's gradients
            _, grads[mb] = w.head_backward(key, mb, outs[mb] + hidden(mb, 0.1), ids[(mb + 1) % m], m)
        for mb in order:
            w.embed_backward(key, mb, grads[mb])
    else:
        late = order[-1] if late_forward else None  # its forward arrives after the others' backward passes
        for mb in range(m):
            if mb != late:
                w.forward(key, mb, hidden(mb))
        for mb in order:
            if mb == late:
                w.forward(key, late, hidden(late))
            w.backward(key, mb, hidden(100 + mb, 1e3 ** (mb % 2)))  # magnitudes apart: rounding shows
    w.prepare(key, m)
    return {n: p.grad.clone() for n, p in w.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [0, 1])
def test_a_stage_trains_the_same_bits_whatever_order_its_backward_passes_arrive_in(stage: int) -> None:
    want = trained_grads(stage, (0, 1, 2, 3))
    for order, late in [((3, 2, 1, 0), False), ((2, 0, 3, 1), False), ((0, 2, 3, 1), True)]:
        got = trained_grads(stage, order, late_forward=late and stage != 0)
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert torch.equal(got[name], g), (order, name)
