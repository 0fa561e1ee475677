"""CheckFree recovery math: pure, deterministic tensor functions with no I/O (reference/checkfree.md §1, §7).

The default rule rebuilds a lost stage i from its neighbours' current weights, weighted by their last
post-clip gradient norms:

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = |g_{i+1}| + 1e-4,   b = |g_{i-1}| + 1e-4

tensor by tensor, layers paired by their local index (all transformer stages have identical keys). The
neighbour with the larger recent gradient norm gets the larger weight, as in the reference code. cfnode
extends it to a neighbour at distance d > 1 (two adjacent stages lost) by dividing that side's weight by d.
Other rules exist for ablations: `uniform-avg`, `copy` (the nearer/previous neighbour) and `random` (a fresh
seeded init).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

StateDict = Mapping[str, torch.Tensor]
RULES = ("grad-avg", "uniform-avg", "copy", "random")
EPS = 1e-4


@dataclass(frozen=True)
class Neighbour:
    """One side's weights as fetched for a rebuild."""

    state: StateDict
    grad_norm: float
    """Post-clip L2 norm of that stage's gradient at its last committed step."""
    distance: int = 1
    """How many stages away it is (1 = the direct neighbour)."""
    step: int = 0


def check_compatible(reference: StateDict, other: StateDict, *, what: str) -> None:
    """Same keys, shapes and dtypes, all finite; raises ValueError naming the first difference."""
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise ValueError(f"{what}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in reference.items():
        t = other[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ValueError(f"{what}: {key} is {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {key} contains NaN or Inf")


def weighted_average(prev: Neighbour, nxt: Neighbour, *, eps: float = EPS, power: float = 1.0
                     ) -> dict[str, torch.Tensor]:
    """The CheckFree rule (`grad-avg`): prev = stage i-1 side, nxt = stage i+1 side."""
    a = (abs(nxt.grad_norm) ** power + eps) / nxt.distance
    b = (abs(prev.grad_norm) ** power + eps) / prev.distance
    return {key: (a * nxt.state[key].double() + b * prev.state[key].double()).div(a + b).to(prev.state[key].dtype)
            for key in prev.state}


def uniform_average(prev: Neighbour, nxt: Neighbour) -> dict[str, torch.Tensor]:
    return {key: ((nxt.state[key].double() + prev.state[key].double()) / 2).to(prev.state[key].dtype)
            for key in prev.state}


def copy_of(source: Neighbour) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in source.state.items()}


def rebuild(rule: str, *, prev: Neighbour | None, nxt: Neighbour | None, fresh: StateDict,
            eps: float = EPS, power: float = 1.0) -> tuple[dict[str, torch.Tensor], str]:
    """Rebuild a stage. Returns (state, how) where `how` names what was actually done, e.g. `grad-avg`, or
    `copy(prev)` when only one side survives (a degraded rebuild), or `random`.

    `fresh` is the stage's seeded initial state: the template every input must match, and the `random` rule.
    """
    if rule not in RULES:
        raise ValueError(f"unknown recovery rule {rule!r}; choose one of {RULES}")
    for side, n in (("prev", prev), ("next", nxt)):
        if n is not None:
            check_compatible(fresh, n.state, what=f"{side} neighbour")
    if rule == "random":
        return {k: t.detach().clone() for k, t in fresh.items()}, "random"
    if prev is None and nxt is None:
        raise ValueError("no surviving neighbour to rebuild from")
    if prev is None or nxt is None:
        only = prev if prev is not None else nxt
        assert only is not None
        return copy_of(only), f"copy({'prev' if only is prev else 'next'})"
    if rule == "copy":
        nearer = prev if prev.distance <= nxt.distance else nxt
        return copy_of(nearer), f"copy({'prev' if nearer is prev else 'next'})"
    if rule == "uniform-avg":
        return uniform_average(prev, nxt), "uniform-avg"
    return weighted_average(prev, nxt, eps=eps, power=power), "grad-avg"
