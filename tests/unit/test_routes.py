"""CheckFree+ routes (cfnode.train.schedule): which stage order each microbatch takes, how a stage finds its
neighbours on a route, and parity of a routed pipeline step — run through real StageWorkers the way nodes
pass hops — with the unsplit model (in order for even microbatches, with the swapped layer order for odd)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfnode.config import PRESETS, ConfigError, NodeConfig, RecoveryConfig, preset
from cfnode.model import build_llama, build_stage
from cfnode.train.schedule import (
    AttemptKey,
    route_for,
    route_neighbours,
    swap_pairs,
    swap_partner,
)
from cfnode.train.worker import StageWorker

# The documented orders (docs/recovery.md): odd microbatches run 0 -> 2 -> 1 -> 3 ... -> L -> L-1 -> 0.
DOCUMENTED = {
    4: {0: (1, 2, 3, 4), 1: (2, 1, 4, 3)},
    5: {0: (1, 2, 3, 4, 5), 1: (2, 1, 3, 5, 4)},
    6: {0: (1, 2, 3, 4, 5, 6), 1: (2, 1, 3, 4, 6, 5)},
    8: {0: (1, 2, 3, 4, 5, 6, 7, 8), 1: (2, 1, 3, 4, 5, 6, 8, 7)},
}


@pytest.mark.parametrize("num", sorted(DOCUMENTED))
@pytest.mark.parametrize("mb", range(8))
def test_route_for_matches_the_documented_order(num: int, mb: int) -> None:
    assert route_for(mb, num, swaps=True) == DOCUMENTED[num][mb % 2]
    assert route_for(mb, num, swaps=False) == DOCUMENTED[num][0]


@pytest.mark.parametrize("num", [1, 2, 3])
def test_in_order_routes_need_no_swaps(num: int) -> None:
    assert route_for(1, num, swaps=False) == tuple(range(1, num + 1))
    with pytest.raises(ValueError, match="at least 4"):
        route_for(1, num, swaps=True)


def test_swap_pairs_and_partners_follow_l() -> None:
    assert swap_pairs(4) == ((1, 2), (3, 4))
    assert swap_pairs(12) == ((1, 2), (11, 12))
    assert [swap_partner(i, 6) for i in range(1, 7)] == [2, 1, None, None, 6, 5]
    with pytest.raises(ValueError):
        swap_pairs(3)


@pytest.mark.parametrize("num", [4, 5, 7])
@pytest.mark.parametrize("mb", [0, 1])
def test_following_route_neighbours_visits_each_stage_once_and_backward_reverses(num: int, mb: int) -> None:
    route = route_for(mb, num, swaps=True)
    forward, stage = [], route_neighbours(route, 0)[1]
    while stage != 0:
        forward.append(stage)
        stage = route_neighbours(route, stage)[1]
    assert tuple(forward) == route
    backward, stage = [], route_neighbours(route, 0)[0]
    while stage != 0:
        backward.append(stage)
        stage = route_neighbours(route, stage)[0]
    assert tuple(backward) == route[::-1]


def test_route_neighbours_rejects_a_stage_not_on_the_route() -> None:
    with pytest.raises(ValueError):
        route_neighbours((1, 2, 3, 4), 5)


def test_checkfree_plus_config_needs_four_stages() -> None:
    with pytest.raises(ConfigError, match="--stages >= 4"):
        NodeConfig(model=preset("tiny", num_stages=3), recovery=RecoveryConfig(mode="checkfree+"))
    assert NodeConfig(model=preset("tiny", num_stages=4), recovery=RecoveryConfig(mode="checkfree+")).swaps
    assert not NodeConfig(model=preset("tiny", num_stages=4)).swaps
    with pytest.raises(ConfigError, match="--recovery"):
        RecoveryConfig(mode="checkfree++")


# -- parity of a routed step -----------------------------------------------------------------------------------

CFG = dataclasses.replace(PRESETS["tiny"], num_stages=4, layers_per_stage=1)


def routed_step(workers: dict[int, StageWorker], route: tuple[int, ...], ids: torch.Tensor,
                targets: torch.Tensor) -> float:
    """One microbatch forward and backward, hop by hop, each stage choosing its next hop from the route."""
    key, mb = AttemptKey(0, 1), 0
    for w in workers.values():
        w.begin(key)
    head = workers[0]
    hidden = head.embed(key, mb, ids)
    stage = route_neighbours(route, 0)[1]
    while stage != 0:
        hidden = workers[stage].forward(key, mb, hidden.clone())
        stage = route_neighbours(route, stage)[1]
    loss, grad = head.head_backward(key, mb, hidden.clone(), targets, 1)
    stage = route_neighbours(route, 0)[0]
    while stage != 0:
        grad = workers[stage].backward(key, mb, grad.clone())
        stage = route_neighbours(route, stage)[0]
    head.embed_backward(key, mb, grad)
    return loss


def reference(route: tuple[int, ...], ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
    """The unsplit LlamaForCausalLM with its decoder layers executed in the route's order."""
    model = build_llama(CFG)
    layers = list(model.model.layers)
    model.model.layers = nn.ModuleList([layers[s - 1] for s in route])
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    grads = {f"layer{s}": dict(layers[s - 1].named_parameters()) for s in route}
    grads["head"] = {"embed_tokens.weight": model.model.embed_tokens.weight, "norm.weight": model.model.norm.weight,
                     "lm_head.weight": model.lm_head.weight}
    return float(loss), grads


@pytest.mark.parametrize("mb", [0, 1, 2, 3])
def test_routed_step_matches_the_unsplit_model_in_the_route_order(mb: int) -> None:
    g = torch.Generator().manual_seed(mb)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1), generator=g)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    route = route_for(mb, CFG.num_stages, swaps=True)
    workers = {i: StageWorker(build_stage(CFG, i), stage_idx=i, lr=1e-3, clip_norm=1.0)
               for i in range(CFG.num_stages + 1)}
    loss = routed_step(workers, route, ids, targets)
    ref_loss, ref = reference(route, ids, targets)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for s in range(1, CFG.num_stages + 1):
        got = dict(workers[s].module.named_parameters())
        for name, p in ref[f"layer{s}"].items():
            torch.testing.assert_close(got[f"layers.0.{name}"].grad, p.grad, msg=f"stage {s} {name}")
    head = dict(workers[0].module.named_parameters())
    for name, p in ref["head"].items():
        torch.testing.assert_close(head[name].grad, p.grad, msg=name)
    if mb % 2 == 0:  # even microbatches: the plain model, in order
        assert route == (1, 2, 3, 4)
    else:
        assert route == (2, 1, 4, 3)
        in_order, _ = reference((1, 2, 3, 4), ids, targets)
        assert abs(in_order - loss) > 1e-6, "the swapped order computes a different function"
