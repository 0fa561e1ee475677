"""Pure scheduling decisions of cfnode.train.schedule: launch windows, ring neighbours, attempt keys."""

from __future__ import annotations

import pytest

from cfnode.train.schedule import (
    AttemptKey,
    is_newer,
    launch_order,
    next_stage,
    prev_stage,
    tokens_per_step,
)


def test_launch_order_docstring_example() -> None:
    assert launch_order(4, 2) == [(0, None), (1, None), (2, 0), (3, 1)]


@pytest.mark.parametrize(("m", "window"), [(1, 1), (1, 3), (4, 1), (4, 2), (4, 4), (4, 9), (7, 3), (16, 5)])
def test_launch_order_window_semantics(m: int, window: int) -> None:
    order = launch_order(m, window)
    # every microbatch exactly once, in order
    assert [mb for mb, _ in order] == list(range(m))
    # the first min(m, window) launch at once; every later one waits for the one `window` before it
    for mb, waits_for in order:
        if mb < window:
            assert waits_for is None
        else:
            assert waits_for == mb - window
    # each completion frees at most one slot
    waited = [w for _, w in order if w is not None]
    assert len(waited) == len(set(waited))


@pytest.mark.parametrize(("m", "window"), [(1, 1), (5, 1), (5, 2), (8, 3), (3, 8), (12, 4)])
@pytest.mark.parametrize("completion", ["fifo", "lifo"])
def test_launch_order_never_exceeds_window_when_simulated(m: int, window: int, completion: str) -> None:
    """Drive the order like stage 0 does: launch what is ready, then complete one in-flight microbatch
    (oldest or newest first), and check the in-flight count and that every microbatch runs exactly once."""
    order = launch_order(m, window)
    pending = list(order)
    in_flight: list[int] = []
    done: set[int] = set()
    launched: list[int] = []
    max_seen = 0
    while len(done) < m:
        ready = [(mb, w) for mb, w in pending if w is None or w in done]
        for item in ready:
            pending.remove(item)
            in_flight.append(item[0])
            launched.append(item[0])
        max_seen = max(max_seen, len(in_flight))
        assert len(in_flight) <= window
        assert in_flight, "deadlock: nothing in flight but microbatches remain"
        finished = in_flight.pop(0 if completion == "fifo" else -1)
        done.add(finished)
    assert sorted(launched) == list(range(m))
    assert len(launched) == m
    assert max_seen == min(m, window)


@pytest.mark.parametrize(("m", "window"), [(0, 1), (1, 0), (-1, 2), (3, -2), (0, 0)])
def test_launch_order_invalid(m: int, window: int) -> None:
    with pytest.raises(ValueError):
        launch_order(m, window)


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 7])
def test_ring_neighbours(num_stages: int) -> None:
    ring = num_stages + 1
    for i in range(ring):
        assert 0 <= next_stage(i, num_stages) < ring
        assert prev_stage(next_stage(i, num_stages), num_stages) == i
        assert next_stage(prev_stage(i, num_stages), num_stages) == i
    assert next_stage(num_stages, num_stages) == 0   # L -> 0 (head, loss)
    assert prev_stage(0, num_stages) == num_stages   # backward leaves stage 0 towards L
    assert next_stage(0, num_stages) == 1
    assert prev_stage(1, num_stages) == 0
    # walking forward visits every stage once before returning to 0
    seen, s = [], 0
    for _ in range(ring):
        seen.append(s)
        s = next_stage(s, num_stages)
    assert s == 0 and seen == list(range(ring))


def test_ring_neighbours_concrete() -> None:
    assert [next_stage(i, 3) for i in range(4)] == [1, 2, 3, 0]
    assert [prev_stage(i, 3) for i in range(4)] == [3, 0, 1, 2]
    assert next_stage(0, 1) == 1 and next_stage(1, 1) == 0
    assert prev_stage(0, 1) == 1 and prev_stage(1, 1) == 0


def test_is_newer() -> None:
    assert is_newer(AttemptKey(0, 0), None)
    assert is_newer(AttemptKey(3, 0), AttemptKey(2, 9))      # step dominates attempt
    assert is_newer(AttemptKey(2, 1), AttemptKey(2, 0))      # retry of the same step
    assert not is_newer(AttemptKey(2, 0), AttemptKey(2, 0))  # equal is not newer
    assert not is_newer(AttemptKey(2, 0), AttemptKey(2, 1))
    assert not is_newer(AttemptKey(1, 99), AttemptKey(2, 0))


def test_attempt_key_ordering_and_fields() -> None:
    keys = [AttemptKey(2, 1), AttemptKey(0, 5), AttemptKey(2, 0), AttemptKey(1, 0)]
    assert sorted(keys) == [AttemptKey(0, 5), AttemptKey(1, 0), AttemptKey(2, 0), AttemptKey(2, 1)]
    k = AttemptKey(step=4, attempt=2)
    assert (k.step, k.attempt) == (4, 2)
    assert k == (4, 2)
    assert hash(k) == hash(AttemptKey(4, 2))  # usable as a dict key (the worker's stash)


def test_tokens_per_step() -> None:
    assert tokens_per_step(4, 8, 128) == 4096
    assert tokens_per_step(1, 1, 1) == 1
    assert tokens_per_step(3, 2, 5) == 30
