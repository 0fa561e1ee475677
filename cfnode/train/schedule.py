"""Pure scheduling decisions of a training step: microbatch windows, attempt keys, ring neighbours.

Stage 0 keeps up to `max_in_flight` microbatches in the ring (GPipe-style fill, then one new microbatch each
time one completes); every message carries an `AttemptKey` so stages can tell a retried step from the old one.
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
