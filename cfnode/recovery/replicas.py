"""Who keeps a copy of whose weights (pure). A copy is pushed by its stage after every commit (`rpc_replica`).

* `checkfree+`: stages 1 and L keep stage 0 (embedding, final norm, LM head): stage 0 becomes recoverable. They
  take turns (`replica_turn`: stage 1, stage L, stage 1, ...), which halves the bytes; the fresher copy of the
  two is still of stage 0's last step or the one before.
* `redundant` (the Bamboo-style baseline): every stage keeps its ring successor, i -> i-1 (stage 1's copy on
  stage 0, stage 0's on stage L), and runs the successor's forward redundantly.
* `checkfree`, `checkpoint`: nobody.
"""

from __future__ import annotations


def replica_targets(stage: int, num_stages: int, mode: str) -> tuple[int, ...]:
    """The stages that keep a copy of `stage`."""
    if mode == "checkfree+":
        return (1, num_stages) if stage == 0 else ()
    if mode == "redundant":
        return ((stage - 1) % (num_stages + 1),)
    return ()


def replica_turn(stage: int, num_stages: int, mode: str, after: int | None) -> tuple[int, ...]:
    """The keepers that get `stage`'s next copy: under checkfree+ stage 0's two keepers take turns (the one that
    did not get the previous copy, `after`; stage 1 first), so a skipped step does not break the alternation;
    otherwise every keeper."""
    holders = replica_targets(stage, num_stages, mode)
    if mode == "checkfree+" and len(holders) > 1:
        return (holders[(holders.index(after) + 1) % len(holders)] if after in holders else holders[0],)
    return holders


def replica_of(holder: int, num_stages: int, mode: str) -> int | None:
    """The stage whose copy `holder` keeps (None: it keeps none)."""
    if mode == "checkfree+":
        return 0 if holder in (1, num_stages) else None
    if mode == "redundant":
        return (holder + 1) % (num_stages + 1)
    return None
