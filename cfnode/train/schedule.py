"""Pure scheduling decisions of a training step: microbatch windows, attempt keys, ring neighbours, routes.

Stage 0 keeps up to `max_in_flight` microbatches in the ring (GPipe-style fill, then one new microbatch each
time one completes); every message carries an `AttemptKey` so stages can tell a retried step from the old one.

CheckFree+ (`--recovery checkfree+`, L >= 4) swaps the execution order of stages 1<->2 and L-1<->L on every
odd training microbatch, so each edge stage also learns to act in its partner's place. A message carries its
route (the order of the transformer stages it visits); the backward pass follows the route reversed.
"""

from __future__ import annotations

from typing import NamedTuple


class AttemptKey(NamedTuple):
    """(step, attempt): a retry of step s has the same step and a larger attempt; ordering is lexicographic."""

    step: int
    attempt: int


def launch_order(num_microbatches: int, max_in_flight: int) -> list[tuple[int, int | None]]:
    """For each microbatch, the microbatch whose completion frees its slot (None: launched at once).

    >>> launch_order(4, 2)
    [(0, None), (1, None), (2, 0), (3, 1)]
    """
    if num_microbatches < 1 or max_in_flight < 1:
        raise ValueError("num_microbatches and max_in_flight must be >= 1")
    return [(mb, None if mb < max_in_flight else mb - max_in_flight) for mb in range(num_microbatches)]


def next_stage(stage_idx: int, num_stages: int) -> int:
    """Forward successor in the ring 0 -> 1 -> ... -> L -> 0."""
    return (stage_idx + 1) % (num_stages + 1)


def prev_stage(stage_idx: int, num_stages: int) -> int:
    """Forward predecessor in the ring (the backward successor)."""
    return (stage_idx - 1) % (num_stages + 1)


def is_newer(key: AttemptKey, than: AttemptKey | None) -> bool:
    return than is None or tuple(key) > tuple(than)


def tokens_per_step(num_microbatches: int, microbatch_size: int, seq_len: int) -> int:
    return num_microbatches * microbatch_size * seq_len


MIN_STAGES_FOR_SWAPS = 4


def swap_pairs(num_stages: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The CheckFree+ swap pairs (1, 2) and (L-1, L); they must not overlap, so L >= 4."""
    if num_stages < MIN_STAGES_FOR_SWAPS:
        raise ValueError(f"checkfree+ swaps need at least {MIN_STAGES_FOR_SWAPS} transformer stages, "
                         f"got {num_stages}")
    return (1, 2), (num_stages - 1, num_stages)


def swap_partner(stage_idx: int, num_stages: int) -> int | None:
    """The stage that executes in `stage_idx`'s place on swapped microbatches (None for middle stages)."""
    for a, b in swap_pairs(num_stages):
        if stage_idx == a:
            return b
        if stage_idx == b:
            return a
    return None


def route_for(mb: int, num_stages: int, *, swaps: bool) -> tuple[int, ...]:
    """Transformer stages in the order microbatch `mb` visits them (stage 0 is implicit at both ends).

    >>> route_for(0, 4, swaps=True), route_for(1, 4, swaps=True), route_for(1, 5, swaps=True)
    ((1, 2, 3, 4), (2, 1, 4, 3), (2, 1, 3, 5, 4))
    """
    order = list(range(1, num_stages + 1))
    if swaps and mb % 2 == 1:
        for a, b in swap_pairs(num_stages):
            order[a - 1], order[b - 1] = order[b - 1], order[a - 1]
    return tuple(order)


def route_neighbours(route: tuple[int, ...] | list[int], stage_idx: int) -> tuple[int, int]:
    """(forward predecessor, forward successor) of `stage_idx` on `route`; 0 is stage 0 at either end.

    The backward pass runs the route reversed: a stage receives gradients from its forward successor and
    sends them to its forward predecessor.
    """
    if stage_idx == 0:
        return route[-1], route[0]
    pos = list(route).index(stage_idx)  # ValueError if the stage is not on the route
    before = route[pos - 1] if pos > 0 else 0
    after = route[pos + 1] if pos + 1 < len(route) else 0
    return before, after
