"""Stage 0's microbatches spread over its group (docs/groups.md "Stage 0's group"): the driver pins each one's
origin, a follower is handed its own (rpc_assign) and reports them done (rpc_done), hops end at the origin, and a
follower lost mid-step hands its microbatches back to the lead."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cfnode.config import NodeConfig, TrainConfig, preset
from cfnode.errors import InvalidPayload, PeerUnavailableError
from cfnode.model.stages import build_stage
from cfnode.node.hops import HopHandling
from cfnode.train.origin import OriginRuns
from cfnode.train.paths import AttemptPaths
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker

CFG = NodeConfig(model=preset("tiny", num_stages=2), train=TrainConfig(num_microbatches=4, microbatch_size=2))
LEAD, FOLLOWER, S1, S2 = "lead", "follower", "s1", "s2"


def test_stage_0s_microbatches_are_spread_over_its_group_and_counted_per_member() -> None:
    paths = AttemptPaths()
    paths.start({0: [(LEAD, 0.0), (FOLLOWER, 0.0)], 1: [(S1, 1.0)], 2: [(S2, 1.0)]})
    for mb in range(4):
        assert paths.pin("train", mb, (1, 2)) == [S1, S2]
    origins = [paths.origin("train", mb) for mb in range(4)]
    assert sorted(origins) == sorted([LEAD, LEAD, FOLLOWER, FOLLOWER]), origins  # queue depth alternates them
    assert paths.samples_of(0, LEAD) == paths.samples_of(0, FOLLOWER) == 2
    paths.pin("val", 0, (1, 2))
    assert paths.origin("val", 0) is None  # validation runs at the driver
    for mb in range(4):
        paths.done("train", mb)
    assert LEAD not in paths.balancer.queued and FOLLOWER not in paths.balancer.queued


def test_a_lost_follower_hands_its_microbatches_to_the_lead_and_the_lead_is_never_dropped() -> None:
    paths = AttemptPaths()
    paths.start({0: [(LEAD, 0.0), (FOLLOWER, 0.0)], 1: [(S1, 1.0)], 2: [(S2, 1.0)]})
    pinned = {mb: paths.pin("train", mb, (1, 2)) for mb in range(4)}
    followers = [mb for mb in range(4) if paths.origin("train", mb) == FOLLOWER]
    assert not paths.can_drop(LEAD) and paths.can_drop(FOLLOWER)
    assert paths.drop(FOLLOWER) == followers
    assert all(paths.origin("train", mb) == LEAD for mb in range(4))
    assert all(paths.path("train", mb) == pinned[mb] for mb in range(4))  # the transformer stages stay
    assert paths.group(0) == [LEAD] and paths.samples_of(0, LEAD) == 4 and paths.samples_of(0, FOLLOWER) == 0
    assert not paths.can_drop(LEAD)


def test_members_of_stage_0_that_split_the_microbatches_sum_to_one_member_running_all() -> None:
    """Two stage-0 workers each run half a step's microbatches (embedding, head, embedding backward); their
    gradient vectors, weighted by their counts as the all-reduce weighs them, give one worker's gradient."""
    model = preset("tiny", num_stages=2)
    key, num_mb = AttemptKey(0, 1), 4
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.vocab_size, (num_mb, 2, 8), generator=gen)
    targets = torch.randint(0, model.vocab_size, (num_mb, 2, 8), generator=gen)
    grads = torch.randn(num_mb, 2, 8, model.hidden_size, generator=gen)

    def worker() -> StageWorker:
        torch.manual_seed(0)
        return StageWorker(build_stage(model, 0), stage_idx=0, lr=1e-3, clip_norm=1.0)

    def run(w: StageWorker, mbs: list[int]) -> torch.Tensor:
        w.begin(key)
        for mb in mbs:
            w.embed(key, mb, ids[mb])
            w.head_backward(key, mb, torch.randn(2, 8, model.hidden_size, generator=torch.Generator().manual_seed(mb)),
                            targets[mb], num_mb)
            w.embed_backward(key, mb, grads[mb])
        return w.gradient_vector(key, len(mbs))

    whole = run(worker(), [0, 1, 2, 3]) * 4
    a, b = run(worker(), [0, 2]), run(worker(), [1, 3])
    summed = (2 * a + 2 * b) / 4 * num_mb  # the all-reduce's weighted mean, times M (node/commits.py)
    assert torch.allclose(summed, whole, rtol=1e-6, atol=1e-9)


class Stage0Node(HopHandling):
    """The part of a Node hop handling reads, for a member of stage 0's group (or of stage 1, `stage=1`)."""

    def __init__(self, peer_id: str, *, stage: int = 0, driving: bool = False, banned: tuple[str, ...] = ()) -> None:
        self.config = CFG
        self.stage = stage
        self.peer_id = peer_id
        self.driving = driving
        self.run_id = "run"
        self.generation = 1
        self.worker = StageWorker(build_stage(CFG.model, stage), stage_idx=stage, lr=1e-3, clip_norm=1.0)
        self.routes = SimpleNamespace(is_banned=lambda p: p in banned)
        self.view = SimpleNamespace(group=lambda i: [SimpleNamespace(peer_id=p) for p in (LEAD, FOLLOWER)])
        self.driver = SimpleNamespace(runs=OriginRuns(self))
        self._seen_hops: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self.spawned: list[str] = []

    def check_step(self, worker: StageWorker, key: AttemptKey) -> None:
        if key.step != worker.step:
            raise InvalidPayload("stale_step", "another step")

    async def compute(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def spawn(self, coro: Any, name: str) -> None:
        coro.close()
        self.spawned.append(name)

    def route(self, stage_idx: int) -> str:
        return {0: LEAD, 1: S1, 2: S2}[stage_idx]


def assigned(**over: Any) -> dict[str, Any]:
    return {"run": "run", "step": 0, "attempt": 9, "mb": 1, "num_mb": 4, "generation": 1, "from_stage": 0,
            "to_stage": 1, "kind": "train", "route": [1, 2], "path": [S1, S2], "driver": LEAD, "origin": FOLLOWER,
            **over}


def test_a_follower_starts_an_assigned_microbatch_once_and_refuses_a_wrong_one() -> None:
    node = Stage0Node(FOLLOWER)
    asyncio.run(node.accept_assign(assigned(), LEAD))
    asyncio.run(node.accept_assign(assigned(), LEAD))  # a retry after a lost reply starts nothing twice
    assert node.spawned == ["assigned"] and node.worker.active == AttemptKey(0, 9)
    asyncio.run(node.accept_assign(assigned(inc=1), LEAD))  # sent again around a lost member
    assert node.spawned == ["assigned", "assigned"]
    refusals = {
        "unauthorized": [(assigned(), S1), (assigned(origin=LEAD), LEAD)],
        "route": [(assigned(path=None), LEAD), (assigned(to_stage=2), LEAD), (assigned(inc=-1), LEAD)],
        "decode": [(assigned(kind="val"), LEAD), (assigned(mb=4), LEAD)],
        "stale_step": [(assigned(step=3), LEAD)],
    }
    for reason, calls in refusals.items():
        for meta, sender in calls:
            with pytest.raises(InvalidPayload) as e:
                asyncio.run(node.accept_assign(meta, sender))
            assert e.value.reason == reason, (meta, sender, e.value)
    with pytest.raises(InvalidPayload, match="follower"):
        asyncio.run(Stage0Node(LEAD, driving=True).accept_assign(assigned(origin=LEAD), LEAD))


def test_hops_end_at_the_origin_and_only_the_origin_may_send_from_stage_0() -> None:
    last = Stage0Node(S2, stage=2)
    meta = assigned(from_stage=1, to_stage=2)
    assert last.hop_peer(meta, 0) == FOLLOWER and last.path_peer(meta, 0) == FOLLOWER
    assert last.hop_peer({**meta, "origin": LEAD}, 0) == LEAD  # the driver's own microbatch
    assert last.hop_peer({k: v for k, v in meta.items() if k != "origin"}, 0) == LEAD
    with pytest.raises(PeerUnavailableError):
        Stage0Node(S2, stage=2, banned=(FOLLOWER,)).hop_peer(meta, 0)
    first = Stage0Node(S1, stage=1)
    first.check_path("forward", assigned(), FOLLOWER)
    with pytest.raises(InvalidPayload, match="origin"):
        first.check_path("forward", assigned(), LEAD)  # the driver, but not this microbatch's origin
    follower = Stage0Node(FOLLOWER)
    follower.check_path("forward", assigned(from_stage=2), S2)
    with pytest.raises(InvalidPayload, match="origin"):
        follower.check_path("forward", assigned(from_stage=2, origin=LEAD), S2)


def test_an_origin_drops_hops_of_other_attempts_and_superseded_incarnations() -> None:
    node = Stage0Node(FOLLOWER)
    runs: OriginRuns = node.driver.runs
    key = AttemptKey(0, 9)
    with pytest.raises(InvalidPayload, match="not in progress"):
        runs.accept("forward", assigned(), key)
    assert runs.take(key, assigned())
    assert runs.accept("forward", assigned(), key)
    with pytest.raises(InvalidPayload, match="not one we run"):
        runs.accept("forward", assigned(mb=2), key)
    assert runs.take(key, assigned(inc=1)) and not runs.take(key, assigned(inc=0))
    assert not runs.accept("forward", assigned(), key)  # inc 0, superseded: acknowledged and dropped
    with pytest.raises(InvalidPayload, match="not in progress"):
        runs.accept("forward", assigned(attempt=8), AttemptKey(0, 8))
